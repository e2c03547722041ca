"""check_accuracy.py's run: evaluate a run's epochs as they appear, the seed's check_accuracy, batched and overlapped.

For each epoch: wait for its SavedModel (engine/model_wait.py), score the validation store's views under the
chosen protocol (engine/scoring.py: 10, 1 or 50 views, averaged softmax, top-1/top-5), print the seed's
`Epoch# e  Top 1 accuracy: x%  Top 5 accuracy: y%` line and record it (engine/accuracy_log.py:
<run>/accuracy.csv, accuracy.png and the validation TensorBoard scalars).
"""
import os


from data.sources.val_store import open_val_store
from engine import run_folder
from engine.accuracy_log import CSV_NAME, first_missing_epoch, record, refresh, write_tensorboard
from engine.model_wait import SavedModelPredictor, say_flushed, wait_for_model
from engine.scoring import check_protocol, evaluate_epoch
from utils.cli import check_epoch_range



def result_line(result):
    return (f"Epoch# {result.epoch}  Top 1 accuracy: {result.top1:.2f}%  Top 5 accuracy: {result.top5:.2f}%  "
            f"({'EMA weights, ' if result.weights == 'ema' else ''}"
            f"{result.protocol} view{'' if result.protocol == 1 else 's'}"
            f"{f' at crop {result.crop}' if result.crop else ''}, {result.images} images, "
            f"{result.images_per_second:.0f} images/s)")


def check_accuracy(settings, run, epoch_start, epoch_end, views=10, timeout=None, batch_images=None,
                   poll=2.0, say=say_flushed, weights="raw", crop=None):
    """Evaluate epochs [epoch_start, epoch_end) of a run as they appear, with views `crop` pixels square
    (default: the store's, [images] crop_size when it was built); returns the EpochResults."""
    path = run_folder.run_dir(settings.train.path_for_saving, run)
    store = open_val_store(settings.preprocess_val.path_to_save)
    default_crop = store.crop  # [images] crop_size when preprocess_val.py built the store
    crop = crop or default_crop
    if epoch_start == "auto":
        epoch_start = first_missing_epoch(path, views, epoch_end, weights, crop)
        if epoch_start == epoch_end:
            refresh(path)
            say(f"Nothing to do: every epoch below {epoch_end} already has a {views}-view {weights} {crop} px row in "
                f"{os.path.join(path, CSV_NAME)}.")
            return []
    check_epoch_range(epoch_start, epoch_end)
    check_protocol(store, views)
    store.check_crop(views, crop)
    expected = settings.preprocess_val.N
    say(f"Evaluating {path} epochs {epoch_start}..{epoch_end - 1} with the {views}-view protocol on "
        f"{len(store)} validation images at crop {crop}.")
    if len(store.classes) <= 5:
        say(f"note: the validation set has {len(store.classes)} classes, so every image's class is among the best "
            f"five: top-5 accuracy is 100% by construction; read top-1.")
    results = []
    for epoch in range(epoch_start, epoch_end):
        predictor = SavedModelPredictor(wait_for_model(path, epoch, timeout=timeout, poll=poll, say=say,
                                                       weights=weights))
        result = evaluate_epoch(predictor, store, views, epoch, batch_images, crop=crop)
        result.weights = weights
        say(result_line(result))
        if expected and result.images != expected:
            say(f"warning: evaluated {result.images} images but [preprocess_val] N = {expected}; "
                f"the accuracy is not comparable with a full validation run.")
        csv_path, png_path = record(path, result, default_crop)
        write_tensorboard(path, result, default_crop)
        results.append(result)
    say(f"Results: {csv_path}  Plot: {png_path}")
    return results
