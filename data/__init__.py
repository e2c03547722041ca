"""The data side, with no TensorFlow: sources (what images exist, in which order) -> transforms (one image in,
one uint8 crop out) -> buffer (the file protocol between the producer and the trainer)."""
