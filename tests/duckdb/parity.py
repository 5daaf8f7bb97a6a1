#!/usr/bin/env python3
"""Stock DuckDB (PyPI `duckdb`, the version .ci/run pins) with the threatlake extension.

    parity.py EXTENSION MODEL_DIR LAKE_DIR DOMAIN

Prints one JSON object: the extension's answers over every procedure example of DOMAIN in the lake
(read straight from Parquet), plus NULL/empty/error behaviour. tests/it/duckdb.rs compares them with
DataFusion's.
"""

import json
import os
import sys

import duckdb


def literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def error_of(con, sql: str) -> str:
    try:
        con.execute(sql).fetchall()
    except duckdb.Error as e:  # noqa: PERF203
        return str(e)
    return ""


# A two-paragraph ICS report (the extension and DataFusion must find the same techniques in it).
REPORT = (
    "The actor sent unauthorized command messages to the PLC to open the breakers.\n\n"
    "Later they modified the controller program and uploaded new logic to the PLC."
)


def main() -> None:
    ext, model, lake, domain = sys.argv[1:5]
    out = {"duckdb_version": duckdb.__version__}
    # No model where the environment points: LOAD still works, mapping says how to get one.
    os.environ["THREATLAKE_MODEL"] = os.path.join(lake, "no-such-model")
    con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    con.execute(f"LOAD {literal(ext)}")
    out["no_model_error"] = error_of(con, "SELECT map_technique('powershell')")
    out["use_model"] = con.execute(f"SELECT threatlake_use_model({literal(model)})").fetchone()[0]
    procedures = os.path.join(lake, "mitre_attack_procedures", "**", "*.parquet")
    rows = con.execute(
        f"""
        SELECT relationship_id,
               map_technique(description) AS technique,
               technique_score(description, 'T0855') AS score,
               to_json(map_techniques(description, 3)) AS top3
        FROM read_parquet({literal(procedures)}, hive_partitioning = true, hive_types_autocast = false)
        WHERE domain = {literal(domain)}
        ORDER BY relationship_id
        """
    ).fetchall()
    out["rows"] = [
        {"id": r[0], "technique": r[1], "score": r[2], "top3": json.loads(r[3]) if r[3] else None}
        for r in rows
    ]
    out["nulls"] = con.execute(
        "SELECT map_technique(NULL), map_technique(''), map_techniques(NULL, 3), "
        "technique_score(NULL, 'T0855'), explain_mapping(NULL)"
    ).fetchone()
    out["unknown_technique_error"] = error_of(con, "SELECT technique_score('powershell', 'T9999')")
    out["bad_k_error"] = error_of(con, "SELECT map_techniques('powershell', -1)")
    out["bad_model_error"] = error_of(con, f"SELECT threatlake_use_model({literal(lake)})")
    report = con.execute(
        "SELECT to_json(map_report(?)), map_report(NULL)", [REPORT]
    ).fetchone()
    out["report"] = [json.loads(report[0]), report[1]]
    out["explain"] = con.execute(
        "SELECT explain_mapping('The actor sent unauthorized command messages to the PLC')"
    ).fetchone()[0]
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
