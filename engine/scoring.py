"""Scoring views: the evaluation protocols (10, 1 or 50 views per image), the averaged softmax, top-1/top-5 hits,
and the overlapped loop (a background thread stacks the next batches while the model runs).

Protocols (number of views per image, all from preprocess_val.py's store):
  10  resize the shorter side to [images] eval_resize, 4 corner crops + centre crop, each also
      flipped (the seed's README protocol, the default);
   1  the single centre crop at eval_resize (the TF official ResNet recipe's single-crop figure);
  50  5 scales ([images] eval_scales_50) x 5 crops x 2 flips (what the original code ran).
For each image the SOFTMAX PROBABILITIES of its views are averaged (not the logits), then
ranked: top-1 is the best class, top-5 any of the best five. Ties rank the lower class index
first, so a result never depends on sort internals.

Speed: many images' views go to the model in one call, and a background thread reads and
stacks the next batches while the model runs (TensorFlow releases the GIL while it computes).
"""
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from engine.prefetch import prefetch
from utils.errors import UserError


PROTOCOLS = (10, 1, 50)
DEFAULT_VIEWS_PER_CALL = 256  # views per forward call when --batch_images is not given


def average_views(probabilities, views):
    """[n*V, C] per-view probabilities -> [n, C] mean over each image's V views (float64)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return probabilities.reshape(-1, views, probabilities.shape[-1]).mean(axis=1)


def topk_hits(scores, labels, ks=(1, 5)):
    """Number of images whose label is among the k best scores, for each k.

    A stable sort of the negated scores ranks equal scores by class index, so
    ties resolve the same way on every machine.
    """
    order = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :max(ks)]
    hits = order == np.asarray(labels).reshape(-1, 1)
    return {k: int(hits[:, :k].any(axis=1).sum()) for k in ks}


@dataclass
class EpochResult:
    epoch: int
    protocol: int
    top1: float  # percent
    top5: float  # percent
    images: int
    seconds: float
    weights: str = "raw"
    crop: int = None  # the views' side in pixels (None: the store's)

    @property
    def images_per_second(self):
        return self.images / self.seconds if self.seconds > 0 else float("inf")


# ----------------------------------------------------------------------------
# The overlapped loop
# ----------------------------------------------------------------------------

def _flattener(prepare=None):
    def flatten(batch):
        views, labels = batch
        views = np.asarray(views)
        n, v = views.shape[:2]
        flat = np.ascontiguousarray(views.reshape((n * v,) + views.shape[2:]))
        return (prepare(flat) if prepare else flat), v, np.asarray(labels)
    return flatten


def score(predict, batches, num_classes=None, progress=None):
    """Top-1/top-5 hit counts over `batches` of (views [n,V,h,w,3] uint8, labels [n]).

    predict: callable [n*V,h,w,3] uint8 -> [n*V,C] probabilities (tensor or array); its optional
    `prepare(array)` runs on the loading thread. Returns (hits1, hits5, images).
    """
    hits1 = hits5 = images = 0
    for flat, views, labels in prefetch(batches, convert=_flattener(getattr(predict, "prepare", None)), name="eval-prefetch"):
        probabilities = np.asarray(predict(flat))
        if num_classes is not None and probabilities.shape[-1] != num_classes:
            raise UserError(f"The model predicts {probabilities.shape[-1]} classes but the validation set has "
                            f"{num_classes}; evaluate with the config the model was trained with.")
        hits = topk_hits(average_views(probabilities, views), labels)
        hits1 += hits[1]
        hits5 += hits[5]
        images += len(labels)
        if progress is not None:
            progress(len(labels))
    return hits1, hits5, images


def images_per_call(protocol, batch_images=None):
    """Images per forward call: --batch_images, or about DEFAULT_VIEWS_PER_CALL views."""
    if batch_images:
        return int(batch_images)
    return max(1, DEFAULT_VIEWS_PER_CALL // protocol)


def check_protocol(store, protocol):
    if protocol not in PROTOCOLS:
        raise UserError(f"--views must be one of {', '.join(map(str, PROTOCOLS))}, received {protocol}.")
    available = getattr(store, "protocols", None)
    if available is not None and protocol not in available:
        raise UserError(f"The validation store at {getattr(store, 'path', '?')} has no {protocol}-view data "
                        f"(it holds protocols {sorted(available)}); set [preprocess_val] views_50 = true and "
                        f"rerun preprocess_val.py, or use --views 10.")


def evaluate_epoch(predict, store, protocol, epoch, batch_images=None, show_progress=True, crop=None):
    """Evaluate one model on the whole store with one protocol, its views `crop` pixels square (default: the
    store's crop; up to its eval_resize: training at low resolution and testing higher is the FixRes effect);
    returns EpochResult."""
    check_protocol(store, protocol)
    n = images_per_call(protocol, batch_images)
    bar = _progress_bar(len(store), f"epoch {epoch}, {protocol} views") if show_progress else None
    start = time.perf_counter()
    try:
        batches = store.iter_batches(protocol, n, crop=crop) if crop else store.iter_batches(protocol, n)
        hits1, hits5, images = score(predict, batches, num_classes=len(store.classes),
                                     progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - start
    if images == 0:
        raise UserError(f"The validation store at {getattr(store, 'path', '?')} holds no images; "
                        f"rerun preprocess_val.py.")
    return EpochResult(epoch=epoch, protocol=protocol, top1=100.0 * hits1 / images, top5=100.0 * hits5 / images,
                       images=images, seconds=seconds, crop=crop or getattr(store, "crop", None))


def _progress_bar(total, desc):
    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=None, mininterval=1.0)

