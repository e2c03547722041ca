"""Transforms: one image in, one uint8 crop out; no files written, no processes.

  images          decode any source by content (file or TFRecord record: read_source), resizing, eval views
  jpeg_window     decode only a window of a JPEG (TurboJPEG crop + DCT scaling, PIL draft) and resample it
  scale_crop      random shorter side S, random crop, flip, lighting draws (the recipe of the original write-up)
  inception_crop  Inception's distorted bounding-box crop (TF official ResNet)
  tiny_augment    the Tiny ImageNet augmentation pipeline
  families        the three crop families behind one signature, looked up by [images] augmentation
  progressive     crop size per epoch ([images] crop_schedule)
Pure functions of (image, draws): the same inputs give the same bytes in any process.
"""
