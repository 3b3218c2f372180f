"""The user's config: the plan's fields and the user's own (``width``, ``learning_rate``)."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.owner = ""  # set by experiments.train from --key
  c.seed = 0
  c.k = 4
  c.steps = 12
  c.batch_size = 32
  c.runner = "scan"
  c.width = 32
  c.learning_rate = 0.01
  return c
