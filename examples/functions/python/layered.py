"""A plain Lambda handler that imports a module from its layer: see
`[functions.layered]` in examples/pipeline.toml and
examples/layers/text-tools/python/textstats.py (at /opt/python in the
sandbox)."""

import textstats


def handler(event, context):
    return {"longest": textstats.longest_word(event.get("text", ""))}
