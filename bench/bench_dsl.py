"""validate+compile cost per file, as a ratio to plain `yaml.safe_load` of the same files.

Cases: one 200-step workflow, and a folder of 500 workflows. Prints medians of several
repetitions measured side by side in this one run (aim: ratio <= 5x).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsl import check_file


def big_workflow(steps: int) -> str:
    lines = [
        "id: big",
        'version: "1"',
        "trigger: {event: go}",
        "schema: {type: object, properties: {url: {type: string}}}",
        "steps:",
    ]
    for i in range(steps):
        kind = i % 4
        lines.append(f"  - id: s{i}")
        if kind == 0:
            lines.append(f'    log: "step {i} for {{{{ payload.url }}}}"')
        elif kind == 1:
            lines += [
                "    call: images.process",
                f'    with: {{url: "{{{{ payload.url }}}}/{i}"}}',
                "    retry: {max_attempts: 3, min_delay: 1s}",
                "    timeout: 30s",
            ]
        elif kind == 2:
            lines += ["    wait: 3 seconds", "    when: payload.url.startswith('https')"]
        else:
            lines += [
                "    call: images.process",
                f'    with: {{url: "{{{{ steps.s{i - 2}.output }}}}"}}',
            ]
    lines.append('output: "{{ steps.s1.output }}"')
    return "\n".join(lines) + "\n"


def timed(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="dy-bench-"))
    big = root / "big.yaml"
    big.write_text(big_workflow(200))
    folder = root / "many"
    folder.mkdir()
    examples = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.yaml"))
    texts = [p.read_text() for p in examples]
    for i in range(500):
        text = texts[i % len(texts)]
        first_id = text.split("\nid: ", 1)[1].split("\n", 1)[0]
        (folder / f"wf{i}.yaml").write_text(text.replace(f"id: {first_id}", f"id: wf-{i}", 1))
    files = sorted(folder.glob("*.yaml"))
    assert check_file(big)[0] is not None and all(check_file(f)[0] is not None for f in files[:4])

    rows = []
    load_big = timed(lambda: yaml.safe_load(big.read_text()), 15)
    ours_big = timed(lambda: check_file(big), 15)
    rows.append(("200-step workflow (per file)", load_big, ours_big))
    load_many = timed(lambda: [yaml.safe_load(f.read_text()) for f in files], 5) / len(files)
    ours_many = timed(lambda: [check_file(f) for f in files], 5) / len(files)
    rows.append(("folder of 500 workflows (per file)", load_many, ours_many))
    print(f"{'case':<36} {'yaml.safe_load':>15} {'validate+compile':>17} {'ratio':>7}")
    for name, base, ours in rows:
        print(f"{name:<36} {base * 1000:>12.2f} ms {ours * 1000:>14.2f} ms {ours / base:>6.2f}x")


if __name__ == "__main__":
    main()
