"""Command-line tools beside the scripts: the demo, the launcher, the demo dataset and the TFRecord builder."""
