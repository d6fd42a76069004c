"""A module shipped in a layer (Lambda layers): `examples/layers/text-tools`
is declared as a layer of the `layered` function in examples/pipeline.toml,
so the sandbox has this file at /opt/python/textstats.py, where the Python
runtime imports from, as Lambda's does."""


def longest_word(text):
    """The longest word of `text` (the first of equal length), or None."""
    words = text.split()
    return max(words, key=len) if words else None
