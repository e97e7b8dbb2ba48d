"""Lints and renders the chart offline (Helm's Go library, no helm binary).

usage: render.py CHART OUTDIR [VALUES.yaml]
Writes each non-empty rendered manifest to OUTDIR; exits non-zero with the
findings when lint reports an error or a template fails to render.
"""
import os
import sys

import helm_python as helm
import yaml

chart_dir, out_dir = sys.argv[1], sys.argv[2]
values = yaml.safe_load(open(sys.argv[3])) if len(sys.argv) > 3 else {}
report = helm.lint(chart_dir, values, strict=True)
errors = [m for m in report.get("messages", []) if m.get("severity", 0) >= 3] + list(report.get("errors") or [])
if errors:
    print("helm lint:", errors, file=sys.stderr)
    sys.exit(1)
chart = helm.Chart.load(chart_dir)
rendered = chart.render(values, name="cep", namespace="stream", is_install=True)
os.makedirs(out_dir, exist_ok=True)
for path, text in rendered.items():
    if path.endswith(".yaml") and text.strip():
        with open(os.path.join(out_dir, os.path.basename(path)), "w") as f:
            f.write(text)
    elif path.endswith("NOTES.txt"):
        with open(os.path.join(out_dir, "NOTES.txt"), "w") as f:
            f.write(text)
