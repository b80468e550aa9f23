#!/usr/bin/env bash
# Regenerate the example report in docs/report/ from a real sweep of the default model.
#
#   scripts/make_example_report.sh            # sweep examples/sweep.yaml into build/example.db, then report
#   DB=other.db SWEEP=my.yaml scripts/make_example_report.sh
#
# The sweep resumes: rerunning after an interruption (or with more methods in the YAML) only computes what is
# missing. The report is Markdown with PNG plots beside it plus one self-contained HTML page.
set -euo pipefail
cd "$(dirname "$0")/.."
QUANTBENCH=${QUANTBENCH:-quantbench}
SWEEP=${SWEEP:-examples/sweep.yaml}
DB=${DB:-build/example.db}
OUT=${OUT:-docs/report}
mkdir -p "$(dirname "$DB")"
$QUANTBENCH sweep "$SWEEP" --db "$DB" --no-progress 2>&1 | tee "$(dirname "$DB")/example-sweep.log"
rm -rf "$OUT"
$QUANTBENCH report --db "$DB" --sweep example --format md,html,csv --out "$OUT"
du -sh "$OUT"
