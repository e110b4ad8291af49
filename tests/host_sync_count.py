"""``python tests/host_sync_count.py <overrides>``: the training command with test_host_syncs.py's counter in this
process and in every process Lightning starts from it (they run this file again); each writes its per-step counts
to ``$COUNT_DIR/rank<r>.json``."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_host_syncs import counting  # noqa: E402


def main() -> None:
    from deit_train.__main__ import main as train_main

    with counting() as counter:
        try:
            train_main()
        finally:
            counts = {kind: counter.per_step(kind) for kind in ("read", "logging read", "copy")}
            counts["sites"] = [{f"{kind} {site}": n for (kind, site), n in step.items()} for step in counter.steps]
            rank = int(os.environ.get("LOCAL_RANK", 0))
            with open(os.path.join(os.environ["COUNT_DIR"], f"rank{rank}.json"), "w") as handle:
                json.dump(counts, handle, indent=1)


if __name__ == "__main__":
    main()
