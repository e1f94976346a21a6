"""``python -m aniportrait.data.prepare input=DIR output=ROOT [key=value ...]``; exit 2 on bad input."""

from __future__ import annotations

import logging
import shlex
import sys

from aniportrait.data.prepare import parse_overrides, prepare_dataset
from aniportrait.errors import AniPortraitError
from aniportrait.utils import signals


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if any(flag in arguments for flag in ("-h", "--help")):
        print(__doc__.strip())
        print("Options and defaults: aniportrait/data/prepare/config.py (PrepareConfig); guide: datasets/any_folder/README.md")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with signals.signals_raise():
            result = prepare_dataset(parse_overrides(arguments))
    except AniPortraitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except signals.Interrupted as error:
        return signals.report(error, kept="every finished source video's clips (unfinished ones are removed)",
                              resume="rerun " + shlex.join(["python", "-m", "aniportrait.data.prepare", *arguments]))
    print(result.summary)
    print(f"manifest: {result.manifest}")
    print(f"QC report: {result.report_markdown} (all entries: {result.report_json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
