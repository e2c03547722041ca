"""Progressive resizing: the training crop size as a function of the epoch.

[images] crop_schedule = '0:32, 10:48, 20:64' means 32-pixel crops for epochs 0-9,
48 for 10-19 and 64 from epoch 20 on (the Tiny ImageNet recipe trained on random 32 and 48 px
crops before the full 64 px images). Empty means [images] crop_size for every epoch.
The producer writes the schedule into the buffer manifest ('crop_sizes', the same
[[first_epoch, crop], ...] list), and the trainer reads each epoch's size from there,
so both always agree. Evaluation is at [images] crop_size, the largest size allowed.
"""
from utils.errors import ConfigError

KEY = "[images] crop_schedule"
MIN_CROP = 8


def parse_crop_schedule(text, full_size):
    """[[first_epoch, crop], ...] from 'epoch:crop, ...'; raises ConfigError naming what was expected."""
    if not text.strip():
        return [[0, int(full_size)]]
    schedule = []
    for part in text.split(","):
        epoch_text, sep, crop_text = part.partition(":")
        try:
            if not sep:
                raise ValueError
            schedule.append([int(epoch_text), int(crop_text)])
        except ValueError:
            raise ConfigError(f"{KEY} must be 'epoch:crop, ...' such as '0:32, 10:48, 20:64', "
                              f"received '{text.strip()}'.") from None
    if schedule[0][0] != 0:
        raise ConfigError(f"{KEY} must start at epoch 0 ('0:crop, ...'), received '{text.strip()}'.")
    epochs = [epoch for epoch, _ in schedule]
    if any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise ConfigError(f"{KEY} epochs must increase, received '{text.strip()}'.")
    for _, crop in schedule:
        if not MIN_CROP <= crop <= full_size:
            raise ConfigError(f"{KEY} crops must lie in [{MIN_CROP}, [images] crop_size = {full_size}], "
                              f"received {crop}.")
    return schedule


def crop_for(schedule, epoch):
    """The crop size of `epoch` under a [[first_epoch, crop], ...] schedule."""
    size = schedule[0][1]
    for first_epoch, crop in schedule:
        if epoch >= first_epoch:
            size = crop
    return size


def largest_crop(schedule):
    return max(crop for _, crop in schedule)
