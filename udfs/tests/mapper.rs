//! Mapper behaviour on a small synthetic ATT&CK-like training set: fitting, determinism, save/load,
//! the Arrow kernels, argument errors and hostile input.

use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, StringArray};
use threatlake_udfs::mapper::{Example, Mapper, MapperParams, Scratch, TechniqueInfo, TrainingSet};
use threatlake_udfs::mapping_kernels as k;

const TOPICS: &[(&str, &str, &str, &[&str])] = &[
    (
        "T1059.001",
        "PowerShell",
        "execution",
        &[
            "powershell",
            "script",
            "encoded",
            "command",
            "invoke",
            "iex",
        ],
    ),
    (
        "T1003.001",
        "LSASS Memory",
        "credential-access",
        &[
            "lsass",
            "memory",
            "dump",
            "credentials",
            "mimikatz",
            "procdump",
        ],
    ),
    (
        "T1053.005",
        "Scheduled Task",
        "persistence",
        &[
            "scheduled",
            "task",
            "schtasks",
            "trigger",
            "logon",
            "create",
        ],
    ),
    (
        "T1486",
        "Data Encrypted for Impact",
        "impact",
        &["encrypt", "files", "ransom", "note", "extension", "drives"],
    ),
    (
        "T1566.001",
        "Spearphishing Attachment",
        "initial-access",
        &[
            "email",
            "attachment",
            "macro",
            "document",
            "lure",
            "victims",
        ],
    ),
    (
        "T1041",
        "Exfiltration Over C2 Channel",
        "exfiltration",
        &[
            "exfiltrate",
            "channel",
            "upload",
            "archive",
            "stolen",
            "server",
        ],
    ),
];

fn training_set() -> TrainingSet {
    let mut set = TrainingSet {
        domain: "test".into(),
        attack_version: "1.0".into(),
        ..Default::default()
    };
    for (i, (id, name, tactic, words)) in TOPICS.iter().enumerate() {
        set.techniques.push(TechniqueInfo {
            id: id.to_string(),
            name: name.to_string(),
            tactics: vec![tactic.to_string()],
            description: format!(
                "Adversaries may use {} to {} the {}. This involves {} and {} on the host.",
                words[0], words[1], words[2], words[3], words[4]
            ),
            detection: format!("Monitor for {} and {} events.", words[1], words[5]),
        });
        for j in 0..30 {
            let w = |k: usize| words[(j + k) % words.len()];
            set.examples.push(Example {
                technique: id.to_string(),
                text: format!(
                    "The group used {} with {} and {} during operation {}.",
                    w(0),
                    w(1),
                    w(3),
                    j % 7
                ),
                source: format!("source-{}", (i * 30 + j) % 23),
            });
        }
    }
    set.revoked.push(("T1086".into(), "T1059.001".into()));
    set
}

fn params() -> MapperParams {
    MapperParams {
        word_dims: 5,
        sentence_dims: 4,
        drop_components: 0,
        ..MapperParams::default()
    }
}

fn build() -> Mapper {
    Mapper::build(params(), &training_set(), None).expect("fit")
}

#[test]
fn maps_clear_text_and_is_deterministic() {
    let a = build();
    let b = build();
    let mut s = Scratch::default();
    let text = "dumped lsass memory with procdump to get credentials";
    let ra = a.top_k(text, 3, &mut s);
    let rb = b.top_k(text, 3, &mut s);
    assert_eq!(a.model.techniques[ra[0].technique].id, "T1003.001");
    assert_eq!(
        ra, rb,
        "same input and training data must give the same output"
    );
    assert!(ra.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(ra.iter().all(|r| (0.0..=1.0).contains(&r.score)));
}

#[test]
fn unseen_tokens_get_subword_vectors() {
    let m = build();
    let mut v = vec![0f32; m.vectors.dims()];
    // "schtasks.exe" never occurs in training; its n-grams do (from "schtasks").
    assert!(m.vectors.embedding_into("schtasks.exe", &mut v));
    assert!(v.iter().any(|x| *x != 0.0));
    assert!(!m.vectors.embedding_into("qqqq", &mut v));
}

#[test]
fn save_and_load_round_trip() {
    let m = build();
    let dir = tempfile::tempdir().unwrap();
    let manifest = m.manifest(None);
    m.save(dir.path(), &manifest).unwrap();
    let loaded = Mapper::load(dir.path()).unwrap();
    let mut s = Scratch::default();
    for t in [
        "encrypt files and leave a ransom note",
        "macro in an email attachment",
        "nothing relevant here",
    ] {
        assert_eq!(m.top_k(t, 6, &mut s), loaded.top_k(t, 6, &mut s), "{t}");
    }
    assert!(Mapper::load(&dir.path().join("missing"))
        .unwrap_err()
        .to_string()
        .contains("threatlake model build"));
}

#[test]
fn kernels_handle_nulls_k_and_unknown_ids() {
    let m = build();
    let texts = StringArray::from(vec![
        Some("schtasks create a scheduled task at logon"),
        None,
        Some(""),
    ]);
    let best = k::map_technique(&m, &texts, Some(0.0));
    let best = best.as_string::<i32>();
    assert_eq!(best.value(0), "T1053.005");
    assert!(
        best.is_null(1) && best.is_null(2),
        "NULL and empty text abstain"
    );

    let ranked = k::map_techniques(&m, &texts, &Int64Array::from(vec![2])).unwrap();
    let ranked = ranked.as_list::<i32>();
    assert_eq!(ranked.value(0).len(), 2);
    assert!(ranked.is_null(1));
    let zero = k::map_techniques(&m, &texts, &Int64Array::from(vec![0])).unwrap();
    assert_eq!(zero.as_list::<i32>().value(0).len(), 0);
    let e = k::map_techniques(&m, &texts, &Int64Array::from(vec![-3])).unwrap_err();
    assert!(e.to_string().contains("k must be between 0"), "{e}");

    let e = k::technique_score(&m, &texts, &StringArray::from(vec!["T9999"])).unwrap_err();
    assert!(
        e.to_string().contains("unknown technique id 'T9999'"),
        "{e}"
    );
    let revoked = k::technique_score(&m, &texts, &StringArray::from(vec!["T1086"])).unwrap();
    let current = k::technique_score(&m, &texts, &StringArray::from(vec!["T1059.001"])).unwrap();
    assert_eq!(
        revoked
            .as_primitive::<arrow::datatypes::Float64Type>()
            .value(0),
        current
            .as_primitive::<arrow::datatypes::Float64Type>()
            .value(0)
    );

    let ex = k::explain_mapping(&m, &texts, Some(0.5));
    assert!(ex
        .as_string::<i32>()
        .value(0)
        .starts_with("T1053.005 Scheduled Task"));
}

#[test]
fn megabyte_of_hostile_text_is_fine() {
    let m = Arc::new(build());
    let mut big = String::with_capacity(1 << 20);
    let mut i = 0u32;
    while big.len() < (1 << 20) {
        big.push_str(&format!(
            "<script>alert({i})</script> =HYPERLINK(\"x\") \u{202e}token{i} encrypt files "
        ));
        i += 1;
    }
    let texts = StringArray::from(vec![big.as_str()]);
    let out = k::map_techniques(&m, &texts, &Int64Array::from(vec![3])).unwrap();
    let first = out.as_list::<i32>().value(0);
    let ids = first
        .as_struct()
        .column(0)
        .as_string::<i32>()
        .value(0)
        .to_string();
    assert_eq!(ids, "T1486");
}

#[test]
fn invalid_params_are_rejected_before_fitting() {
    let e = MapperParams {
        sentence_dims: 500,
        ..MapperParams::default()
    }
    .check()
    .unwrap_err();
    assert!(e.to_string().contains("sentence_dims"));
    let e = Mapper::build(MapperParams::default(), &TrainingSet::default(), None).unwrap_err();
    assert!(e.to_string().contains("ingest ATT&CK first"));
}

/// More techniques than the scoring shortlist: each has its own words plus words shared with its
/// neighbours, so stage 1 must choose.
fn wide_set(n: usize) -> TrainingSet {
    let mut set = TrainingSet {
        domain: "wide".into(),
        attack_version: "1.0".into(),
        ..Default::default()
    };
    let word = |i: usize, k: usize| format!("w{}x{}", i % n, k);
    for i in 0..n {
        let id = format!("T{}", 1000 + i);
        set.techniques.push(TechniqueInfo {
            id: id.clone(),
            name: format!("Technique {} {}", word(i, 0), word(i, 1)),
            tactics: vec!["execution".into()],
            description: format!(
                "Adversaries may use {} and {} with {} on the host.",
                word(i, 0),
                word(i, 1),
                word(i + 1, 2)
            ),
            detection: format!("Monitor {} and {} events.", word(i, 2), word(i + 2, 3)),
        });
        for j in 0..12 {
            set.examples.push(Example {
                technique: id.clone(),
                text: format!(
                    "The group ran {} then {} and {} in step {}.",
                    word(i, j % 4),
                    word(i, (j + 1) % 4),
                    word(i + 1 + j % 3, j % 4),
                    j
                ),
                source: format!("source-{}", (i * 12 + j) % 37),
            });
        }
    }
    set
}

#[test]
fn shortlisted_and_single_technique_scores_agree() {
    let n = threatlake_udfs::mapper::SHORTLIST * 2 + 10;
    let m = Mapper::build(params(), &wide_set(n), None).expect("fit");
    let mut s = Scratch::default();
    let text = "the operators ran w7x0 and w7x1 then w8x2";
    let top = m.top_k(text, 3, &mut s);
    assert_eq!(m.model.techniques[top[0].technique].id, "T1007");
    // Every technique, shortlisted or not, scored alone equals its score when all are scored.
    let all = m.top_k(text, n, &mut s);
    assert_eq!(all.len(), n);
    for r in all.iter().step_by(7).chain(&top) {
        let alone = m
            .model
            .technique_score(&m.vectors, text, r.technique, &mut s);
        assert!(
            (alone - r.score).abs() < 1e-9,
            "{}: {alone} vs {}",
            m.model.techniques[r.technique].id,
            r.score
        );
    }
    // The top of the shortlist is the top of the full ranking.
    assert_eq!(top, all[..3].to_vec());
    // A technique far down the list still gets a real (non-zero, non-NaN) score.
    let last = all.last().unwrap();
    let alone = m
        .model
        .technique_score(&m.vectors, text, last.technique, &mut s);
    assert!(alone.is_finite() && alone >= 0.0 && alone < top[0].score);
}

#[test]
fn token_cache_never_changes_results() {
    let a = build();
    let b = Mapper::build(params(), &wide_set(60), None).expect("fit");
    let texts = [
        "dumped lsass memory with procdump to get credentials",
        "the operators ran w7x0 and w7x1 then w8x2",
        "encrypt files and leave a ransom note w3x1",
    ];
    // One scratch shared across models and texts (as a worker thread does) versus a fresh one each time.
    let mut shared = Scratch::default();
    for round in 0..2 {
        for t in texts {
            for m in [&a, &b] {
                let warm = m.top_k(t, 5, &mut shared);
                let cold = m.top_k(t, 5, &mut Scratch::default());
                assert_eq!(warm, cold, "round {round}, {t}");
            }
        }
    }
}

/// The synthetic set plus T1059, the parent of its PowerShell technique.
fn set_with_parent() -> TrainingSet {
    let mut set = training_set();
    set.techniques.push(TechniqueInfo {
        id: "T1059".into(),
        name: "Command and Scripting Interpreter".into(),
        tactics: vec!["execution".into()],
        description: "Adversaries may abuse command and script interpreters to execute commands."
            .into(),
        detection: "Monitor for script command interpreter use.".into(),
    });
    for j in 0..20 {
        set.examples.push(Example {
            technique: "T1059".into(),
            text: format!("The group used a script interpreter to run command {j}."),
            source: format!("source-{}", j % 23),
        });
    }
    set
}

#[test]
fn a_report_sentence_supports_its_next_best_techniques_once_each() {
    use threatlake_udfs::mapper::document::{report_support, REPORT_CANDIDATES, REPORT_FLOOR};
    let m = Mapper::build(params(), &set_with_parent(), None).expect("fit");
    let mut s = Scratch::default();
    let id = |t: usize| m.model.techniques[t].id.as_str();
    let sentence = "The operators ran an encoded powershell script command to encrypt files and drop a ransom note on all drives.";
    let top = m.top_k(sentence, REPORT_CANDIDATES, &mut s);
    let strong: Vec<&str> = top
        .iter()
        .filter(|r| r.score >= REPORT_FLOOR)
        .map(|r| id(r.technique))
        .collect();
    // The sentence is about two techniques: both are among its best candidates, and so is the
    // PowerShell technique's parent.
    assert!(
        ["T1486", "T1059.001", "T1059"]
            .iter()
            .all(|t| strong.contains(t)),
        "{strong:?}"
    );
    let (support, units) = report_support(&m, sentence, &mut s);
    assert_eq!(units, 1);
    let of = |want: &str| {
        support
            .iter()
            .find(|e| id(e.technique) == want)
            .unwrap_or_else(|| panic!("{want} not supported: {support:?}"))
    };
    // Both techniques, not only the best one; the parent through its sub-technique.
    for t in ["T1486", "T1059.001", "T1059"] {
        let e = of(t);
        // One sentence is one piece of evidence, even for a parent that is also a candidate.
        assert_eq!(e.sentences, 1, "{t}");
        assert_eq!(e.sentence, sentence);
    }
    // The parent's evidence is its best score in the sentence: at least its sub-technique's.
    assert!(of("T1059").any >= of("T1059.001").any);
    assert_eq!(support.len(), 3, "{support:?}");
}

#[test]
fn the_margin_is_taken_over_another_technique_family() {
    let m = Mapper::build(params(), &set_with_parent(), None).expect("fit");
    let mut s = Scratch::default();
    let id = |t: usize| m.model.techniques[t].id.clone();
    let sentence =
        "The operators ran an encoded powershell script with invoke and iex to run a command.";
    let all = m.model.techniques.len();
    let (ranked, text) = m.model.ranked_logits(&m.vectors, sentence, all, &mut s);
    let family = |t: usize| id(t).split('.').next().unwrap_or_default().to_string();
    // The PowerShell family leads: the sub-technique and its parent are the first two.
    let first_two: Vec<String> = ranked[..2].iter().map(|r| family(r.0)).collect();
    assert_eq!(first_two, ["T1059", "T1059"], "{ranked:?}");
    // The runner-up is the best of another family, not the parent of the answer.
    let other = ranked
        .iter()
        .find(|r| family(r.0) != "T1059")
        .expect("another family")
        .1;
    assert_eq!(text.z2, other.clamp(-30.0, 30.0), "{ranked:?}");
    assert!(text.z2 < ranked[1].1, "{ranked:?}");
    // However few candidates are asked for, the margin (and so the score) is the same.
    for k in [1, 2, 5] {
        let (_, t) = m.model.ranked_logits(&m.vectors, sentence, k, &mut s);
        assert_eq!((t.z1, t.z2), (text.z1, text.z2), "k = {k}");
    }
}
