"""The offline HTML template of ``dvc plots show``: vega, vega-lite and vega-embed inlined.

    python -m pipeline.plots_template PACKS_DIR OUT_HTML

DVC's default page loads the three libraries from a CDN (dvc_render's ``{scripts}``), so the
plots stay blank without a network. ``make install`` fetches the pinned packages from the npm
registry (``npm pack``, into the git-ignored .vendor/) and runs this to inline their builds into
one page; ``make dvc-init`` points ``plots.html_template`` at it (.dvc/config.local). The page has
DVC's ``{plot_divs}`` placeholder and no ``{scripts}`` one, so no CDN tag is ever inserted.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

from aigc.errors import UserError
from aigc.io import atomic_path

# npm package -> its browser build inside the tarball, in load order (vega-embed needs the others).
BUILDS = {"vega": "package/build/vega.min.js", "vega-lite": "package/build/vega-lite.min.js",
          "vega-embed": "package/build/vega-embed.min.js"}

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- {versions}: inlined from the npm registry's packages at install time (no CDN). -->
{inlined}
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def build_template(packs: str | Path, out: str | Path) -> Path:
    """Inline the builds of the ``vega*-<version>.tgz`` packs in PACKS (one of each) into the page OUT."""
    packs = Path(packs)
    scripts, versions = [], []
    for name, member in BUILDS.items():
        found = list(packs.glob(f"{name}-[0-9]*.tgz"))
        if len(found) != 1:
            raise UserError(f"{packs}: {len(found)} {name}-<version>.tgz packs, expected one; delete {packs} and "
                            "run `make plots-template` (npm pack)")
        with tarfile.open(found[-1]) as tar:
            try:
                js = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
            except (KeyError, AttributeError):
                raise UserError(f"{found[-1]}: has no {member}; not the expected {name} package") from None
        if "</script" in js.lower() or "{plot_divs}" in js or "{scripts}" in js:
            raise UserError(f"{found[-1]}: its build cannot be inlined as it is (contains a closing script tag "
                            "or a DVC placeholder)")
        scripts.append(f'    <script type="text/javascript">/* {found[-1].stem} */\n{js}\n    </script>')
        versions.append(found[-1].stem)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(PAGE.format(versions=", ".join(versions), inlined="\n".join(scripts)), encoding="utf-8")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m pipeline.plots_template PACKS_DIR OUT_HTML")
    try:
        print(f"offline plots template: {build_template(sys.argv[1], sys.argv[2])}")
    except UserError as exc:
        sys.exit(f"error: {exc}")
