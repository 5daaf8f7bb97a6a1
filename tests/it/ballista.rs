//! Distributed mode: the same SQL on a Ballista scheduler + executor pair (started in the test
//! process on loopback ports, plans and results crossing gRPC / Arrow Flight) gives the in-process
//! DataFusion answers, `map_technique` included (it runs on the executor).

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::common::{self, run};

fn lake() -> &'static PathBuf {
    static LAKE: OnceLock<PathBuf> = OnceLock::new();
    LAKE.get_or_init(|| common::mapped_ics_lake("ballista"))
}

fn sql(engine: &str, q: &str) -> String {
    let (ok, out, err) = run(common::ics_cli_on(lake())
        .args(["sql", "--engine", engine, "--format", "csv", "--quiet"])
        .arg(format!("--command={q}")));
    assert!(ok, "{engine}: {q}\n{err}");
    out
}

#[test]
fn ballista_runs_the_same_sql_with_map_technique_on_its_executor() {
    let queries = [
        // map_technique over every ICS procedure text, on the executor
        "SELECT relationship_id, map_technique(description) AS t, round(technique_score(description, technique_id), 6) AS s \
         FROM attack_procedures_current ORDER BY relationship_id",
        // an aggregate with a shuffle between stages
        "SELECT map_technique(description) AS t, count(*) AS n FROM mitre_attack_procedures GROUP BY 1 ORDER BY n DESC, t",
        // the shipped views over mapped intel, joined
        "SELECT technique_id, count(*) AS n FROM mapped_threat_data GROUP BY 1 ORDER BY n DESC, technique_id",
    ];
    for q in queries {
        let local = sql("datafusion", q);
        assert!(local.lines().count() > 2, "{q}: {local}");
        assert_eq!(sql("ballista", q), local, "{q}");
    }
    // It really runs on the cluster: Ballista's plan has stages, and map_technique is evaluated
    // inside the stage the executor runs (before the shuffle write).
    let plan = sql(
        "ballista",
        "EXPLAIN SELECT map_technique(description) FROM mitre_attack_procedures",
    );
    let stage = plan
        .split("distributed_plan")
        .nth(1)
        .unwrap_or_else(|| panic!("no distributed plan: {plan}"));
    assert!(stage.contains("ResolvedStage"), "{plan}");
    let shuffle = stage.find("ShuffleWriterExec").expect("a shuffle writer");
    assert!(
        stage[shuffle..].contains("map_technique(description"),
        "{plan}"
    );
}
