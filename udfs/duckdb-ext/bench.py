#!/usr/bin/env python3
"""Stock DuckDB + the threatlake extension vs threatlake's DataFusion engine, side by side.

    python3 udfs/duckdb-ext/bench.py --lake DIR --model DIR --threatlake target/release/threatlake \
        [--ext data/extensions/threatlake.duckdb_extension] [--rows 100000]

1. `SELECT map_technique(text)` over ROWS texts (Enterprise procedure examples cycled, the same set
   `threatlake bench map` uses): rows/s in DuckDB (one run) and in DataFusion (`bench map --runs 1`).
2. Three report queries over the lake (`sql/reports/`): seconds in each engine and the ratio.
DuckDB gets the lake's tables and views from `threatlake lake duckdb-sql`.
"""

import argparse
import os
import re
import subprocess
import time

import duckdb

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REPORTS = ["technique_frequency", "threats_over_time", "top_mapped_techniques"]


def literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lake", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threatlake", required=True, help="a release build of the threatlake binary")
    ap.add_argument("--ext", default=os.path.join(ROOT, "data", "extensions", "threatlake.duckdb_extension"))
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--setup-bin", help="threatlake binary for `lake duckdb-sql` (default: --threatlake)")
    a = ap.parse_args()
    env = dict(os.environ, THREATLAKE_LAKE_ROOT=a.lake, THREATLAKE_MODEL=a.model,
               THREATLAKE_LAKE_MODELS=os.path.dirname(a.model))
    setup = subprocess.run([a.setup_bin or a.threatlake, "lake", "duckdb-sql"], env=env, check=True,
                           capture_output=True, text=True).stdout
    con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    con.execute(f"LOAD {literal(a.ext)}")
    con.execute(f"SELECT threatlake_use_model({literal(a.model)})")
    con.execute(setup)
    texts = [r[0] for r in con.execute(
        "SELECT description FROM attack_procedures_current WHERE domain = 'enterprise' ORDER BY relationship_id"
    ).fetchall()]
    con.execute("CREATE TABLE bench_texts (text VARCHAR)")
    con.executemany("INSERT INTO bench_texts VALUES (?)", [[texts[i % len(texts)]] for i in range(a.rows)])
    con.execute("SELECT map_technique('warm-up: load the model')").fetchall()
    t = time.perf_counter()
    n = con.execute("SELECT count(map_technique(text)) FROM bench_texts").fetchone()[0]
    duck_rate = a.rows / (time.perf_counter() - t)
    out = subprocess.run([a.threatlake, "bench", "map", "--rows", str(a.rows), "--runs", "1"], env=env,
                         check=True, capture_output=True, text=True).stdout
    df_rate = float(re.search(r"median: (\d+) rows/s", out).group(1))
    print(f"map_technique over {a.rows} rows ({n} mapped): DuckDB {duck_rate:,.0f} rows/s, "
          f"DataFusion {df_rate:,.0f} rows/s (DuckDB/DataFusion {duck_rate / df_rate:.2f}x)")
    for name in REPORTS:
        sql = open(os.path.join(ROOT, "sql", "reports", f"{name}.sql")).read()
        t = time.perf_counter()
        rows = len(con.execute(sql).fetchall())
        duck_s = time.perf_counter() - t
        err = subprocess.run([a.threatlake, "sql", "--format", "csv", f"--command={sql}"], env=env, check=True,
                             capture_output=True, text=True).stderr
        df_s = float(re.search(r"rows? in ([\d.]+) s", err).group(1))
        print(f"report {name}: {rows} rows, DuckDB {duck_s:.3f} s, DataFusion {df_s:.3f} s "
              f"(DataFusion/DuckDB {df_s / duck_s:.2f}x)")


if __name__ == "__main__":
    main()
