"""Keras runs on torch in these tests: the backend is chosen once, before Keras is first imported."""

import os

os.environ["KERAS_BACKEND"] = "torch"
