"""Human-readable class names: a synset-words file (wnid -> words) found beside the dataset or named explicitly."""
import os
import re

from utils.errors import UserError

SYNSET_WORD_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "imagenet_metadata.txt")


def find_synset_words(root, explicit=None):
    """{wnid: name} from `explicit`, else from a known synset-words file in `root`; {} if there is none."""
    if explicit:
        if not os.path.isfile(explicit):
            raise UserError(f"The synset-words file {explicit} does not exist; expected lines 'n01440764 tench, ...'.")
        return read_synset_words(explicit)
    for name in SYNSET_WORD_FILES:
        path = os.path.join(root or "", name)
        if root and os.path.isfile(path):
            return read_synset_words(path)
    return {}


def read_synset_words(path):
    """{wnid: human-readable name} from 'n01440764 tench, Tinca tinca' lines (space or tab separated)."""
    names = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.strip().split(None, 1)
            if parts and re.match(r"^n\d{8}$", parts[0]):
                names[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return names
