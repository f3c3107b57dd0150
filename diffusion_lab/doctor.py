"""Check the environment before a long run: versions, imports, clashes, devices, hub reachability, offline modes.

    python -m diffusion_lab.doctor

Each line is ok / warn / FAIL with what to do (``diffusion_lab/utils/doctor.py``). Exit code 1 when
something would break a run.
"""

from __future__ import annotations

from diffusion_lab.utils.doctor import check


def main() -> int:
    rows = check()
    for status, what, advice in rows:
        print(f"[{status:>4}] {what}" + (f"\n       -> {advice}" if advice else ""))
    return 1 if any(s == "FAIL" for s, _, _ in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
