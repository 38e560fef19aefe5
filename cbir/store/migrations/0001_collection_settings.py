"""Record each collection's code source and distribution settings in its metadata.

Collections made before these keys existed use the model's codes on one shard with one replica, which is
what the defaults below say; collections that already have the keys are left as they are.
"""

from __future__ import annotations

DEFAULTS = {"codes": "model", "shards": 1, "replicas": 1}


def up(ctx) -> None:
    for name in ctx.collections():
        meta = ctx.index.get_meta(name)
        missing = {k: v for k, v in DEFAULTS.items() if k not in meta}
        if missing:
            ctx.index.set_meta(name, {**meta, **missing})
            ctx.reporter.log(f"  {name}: recorded {', '.join(f'{k}={v}' for k, v in missing.items())}")
