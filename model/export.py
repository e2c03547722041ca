"""Export a network as a self-contained SavedModel.

Signatures (both return {'logits', 'probabilities'}, float32 [B, num_classes]):
  serving_default  images: uint8 [B, H, W, 3] RGB; normalised inside with the baked-in
                   mu/sigma as (x / 255 - mu) / sigma, by the trainer's own function
                   (model.preprocessing.normalise), so serving sees what training saw.
  normalized       images: float32 [B, H, W, 3], already normalised that way
                   (what model.preprocessing.to_model_input returns with zero lighting).

The loaded object also carries `mu` and `sigma` (float32 [3]). Loading needs only TensorFlow: tf.saved_model.load(path).
"""
import os

import tensorflow as tf

from model.preprocessing import normalisation_constants, normalise
from utils.errors import UserError
from utils.files import atomic_dir

_IMAGES_UINT8 = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")
_IMAGES_FLOAT = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")


class _Serving(tf.Module):
    def __init__(self, net, mu, sigma):
        super().__init__(name="serving")
        self.net = net
        self.mu = tf.Variable(tf.constant(mu, tf.float32, [3]), trainable=False, name="mu")
        self.sigma = tf.Variable(tf.constant(sigma, tf.float32, [3]), trainable=False, name="sigma")
        scale, offset = normalisation_constants(mu, sigma)
        self.scale = tf.Variable(scale, trainable=False, name="scale")
        self.offset = tf.Variable(offset, trainable=False, name="offset")

    @tf.function(input_signature=[_IMAGES_UINT8])
    def serve_uint8(self, images):
        return self.serve_normalized(normalise(images, self.scale, self.offset))

    @tf.function(input_signature=[_IMAGES_FLOAT])
    def serve_normalized(self, images):
        logits = self.net(images, training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}


def export_saved_model(net, path, mu, sigma):
    """Write `net` (inference mode: moving statistics) as a SavedModel folder at `path`.

    The folder appears only when complete; an existing `path` is an error.
    """
    if len(mu) != 3 or len(sigma) != 3 or min(sigma) <= 0:
        raise ValueError(f"expected 3 means and 3 positive stds, received mu={mu}, sigma={sigma}")
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise UserError(f"{path} already exists; remove it or export to another folder.")
    serving = _Serving(net, mu, sigma)
    signatures = {"serving_default": serving.serve_uint8, "normalized": serving.serve_normalized}
    with atomic_dir(path) as tmp:
        tf.saved_model.save(serving, tmp, signatures=signatures)
    return path
