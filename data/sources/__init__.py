"""Sources: what images exist and in which order.

  index        dataset layouts (ImageNet folders, Kaggle CSV, Tiny ImageNet, list files), the DatasetIndex,
               dispatch by [data] source, and each epoch's order (epoch_permutation)
  tfrecord     TFRecord shards: the record format, shard discovery and the per-shard record index
  synsets      class names (synset words files)
  scale_cache  preprocess.py's optional per-scale resize cache
  val_store    preprocess_val.py's packed validation views
  stats        get_mu_sigma.py's channel statistics
Nothing here decodes an image into a crop (data/transforms) or knows the buffer (data/buffer).
"""
