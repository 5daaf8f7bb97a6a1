//! Domain word vectors in finalfusion format: PCA of the word × technique PPMI matrix, with explicit
//! character n-gram vectors so unseen tokens (tool names, file names) still get a vector, optionally
//! extended with general-English pretrained vectors.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read};
use std::path::Path;

use finalfusion::compat::fasttext::ReadFastText;
use finalfusion::embeddings::Embeddings;
use finalfusion::io::{ReadEmbeddings, WriteEmbeddings};
use finalfusion::norms::NdNorms;
use finalfusion::storage::{NdArray, StorageWrap};
use finalfusion::subword::ExplicitIndexer;
use finalfusion::vocab::{ExplicitSubwordVocab, VocabWrap};
use linfa::prelude::*;
use linfa_reduction::Pca;
use ndarray::Array2;

use super::hyperparams::ValidParams;
use super::text;
use super::MapperError;

/// Word vectors (finalfusion embeddings).
pub struct WordVectors {
    emb: Embeddings<VocabWrap, StorageWrap>,
}

impl std::fmt::Debug for WordVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WordVectors({} words x {} dims)",
            self.words(),
            self.dims()
        )
    }
}

impl WordVectors {
    /// Vector dimensions.
    pub fn dims(&self) -> usize {
        self.emb.dims()
    }

    /// Write the vector of `word` (its own, or the mean of its n-grams) into `out`; false if neither exists.
    pub fn embedding_into(&self, word: &str, out: &mut [f32]) -> bool {
        self.emb
            .embedding_into(word, ndarray15::ArrayViewMut1::from(out))
    }

    /// Number of vocabulary words (without n-grams).
    pub fn words(&self) -> usize {
        use finalfusion::vocab::Vocab;
        self.emb.vocab().words_len()
    }

    /// Save in finalfusion format.
    pub fn save(&self, path: &Path) -> Result<(), MapperError> {
        let f = File::create(path)
            .map_err(|e| MapperError::Io(path.display().to_string(), e.to_string()))?;
        let mut w = BufWriter::new(f);
        self.emb
            .write_embeddings(&mut w)
            .map_err(|e| MapperError::Io(path.display().to_string(), e.to_string()))
    }

    /// Read a finalfusion file written by [`WordVectors::save`] (a compact binary: one read, no parsing).
    pub fn load(path: &Path) -> Result<Self, MapperError> {
        let f = File::open(path)
            .map_err(|e| MapperError::Io(path.display().to_string(), e.to_string()))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        let emb = Embeddings::<VocabWrap, StorageWrap>::read_embeddings(&mut r)
            .map_err(|e| MapperError::Io(path.display().to_string(), e.to_string()))?;
        Ok(Self { emb })
    }
}

/// General-English vectors to append to the domain vectors.
pub struct Pretrained {
    /// Lower-cased word → vector (unit length).
    pub vectors: HashMap<String, Vec<f32>>,
    /// Dimensions.
    pub dims: usize,
}

impl Pretrained {
    /// Read word2vec/GloVe text (`.txt`, `.vec`, optionally `.gz`; with or without a dims header) or a
    /// finalfusion file (`.fifu`). Only words in `keep` are kept, so memory stays small.
    pub fn load(path: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Self, MapperError> {
        let io = |e: String| MapperError::Io(path.display().to_string(), e);
        let name = path.to_string_lossy().to_lowercase();
        let mut vectors = HashMap::new();
        if name.ends_with(".fifu") || name.ends_with(".bin") {
            let mut r = BufReader::new(File::open(path).map_err(|e| io(e.to_string()))?);
            let emb = if name.ends_with(".bin") {
                Embeddings::<VocabWrap, StorageWrap>::from(
                    Embeddings::<finalfusion::vocab::FastTextSubwordVocab, NdArray>::read_fasttext(
                        &mut r,
                    )
                    .map_err(|e| io(format!("fastText: {e}")))?,
                )
            } else {
                Embeddings::<VocabWrap, StorageWrap>::read_embeddings(&mut r)
                    .map_err(|e| io(e.to_string()))?
            };
            for (w, e) in emb.iter() {
                if keep(w) {
                    vectors.insert(w.to_lowercase(), e.to_vec());
                }
            }
        } else {
            let file = File::open(path).map_err(|e| io(e.to_string()))?;
            let reader: Box<dyn Read> = if name.ends_with(".gz") {
                Box::new(flate2::read::GzDecoder::new(file))
            } else {
                Box::new(file)
            };
            // Parse line by line ourselves: finalfusion's text readers keep every word, and GloVe 6B
            // has 400k of them; we need a few thousand.
            let r = BufReader::with_capacity(1 << 20, reader);
            for (i, line) in r.lines().enumerate() {
                let line = line.map_err(|e| io(format!("line {}: {e}", i + 1)))?;
                let mut parts = line.split(' ');
                let Some(word) = parts.next() else { continue };
                if i == 0 && parts.clone().count() == 1 {
                    continue; // "N DIMS" header of word2vec text
                }
                if !keep(word) {
                    continue;
                }
                let v: Result<Vec<f32>, _> = parts
                    .filter(|p| !p.is_empty())
                    .map(str::parse::<f32>)
                    .collect();
                let v = v.map_err(|e| io(format!("line {}: {e}", i + 1)))?;
                vectors.insert(word.to_lowercase(), v);
            }
        }
        let dims = vectors.values().next().map_or(0, Vec::len);
        if dims == 0 {
            return Err(io(
                "no vectors for any training word; is this a word-vector file?".into(),
            ));
        }
        for v in vectors.values_mut() {
            if v.len() != dims {
                return Err(io(format!(
                    "inconsistent dimensions ({} vs {dims})",
                    v.len()
                )));
            }
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if n > 0.0 {
                v.iter_mut().for_each(|x| *x /= n);
            }
        }
        Ok(Self { vectors, dims })
    }
}

/// True for tokens that get vectors (content words).
pub fn is_content(t: &str) -> bool {
    t.len() >= 2 && !text::is_stopword(t) && !t.chars().all(|c| c.is_ascii_digit())
}

/// Train domain word vectors from tokenised units labelled with their technique.
/// Returns the vectors and the relative frequency of each vocabulary word (for SIF weights).
pub fn train(
    params: &ValidParams,
    unit_tech: &[usize],
    unit_tokens: &[Vec<String>],
    n_tech: usize,
    pretrained: Option<&Pretrained>,
) -> Result<(WordVectors, HashMap<String, f32>), MapperError> {
    // Counts (BTreeMap: deterministic order).
    let mut freq: BTreeMap<&str, usize> = BTreeMap::new();
    let mut total = 0usize;
    for toks in unit_tokens {
        for t in toks.iter().filter(|t| is_content(t)) {
            *freq.entry(t.as_str()).or_default() += 1;
            total += 1;
        }
    }
    let mut vocab: Vec<(&str, usize)> = freq
        .iter()
        .filter(|(_, c)| **c >= params.min_count)
        .map(|(w, c)| (*w, *c))
        .collect();
    vocab.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if vocab.len() < 3 {
        return Err(MapperError::NoTraining(
            "too little text to learn word vectors".into(),
        ));
    }
    let index: HashMap<&str, usize> = vocab
        .iter()
        .enumerate()
        .map(|(i, (w, _))| (*w, i))
        .collect();

    // PPMI of word × technique.
    let mut m = Array2::<f64>::zeros((vocab.len(), n_tech));
    for (toks, &t) in unit_tokens.iter().zip(unit_tech) {
        for tok in toks {
            if let Some(&w) = index.get(tok.as_str()) {
                m[[w, t]] += 1.0;
            }
        }
    }
    let row: Vec<f64> = m.rows().into_iter().map(|r| r.sum()).collect();
    let col: Vec<f64> = m.columns().into_iter().map(|c| c.sum()).collect();
    let sum: f64 = row.iter().sum();
    for ((w, t), x) in m.indexed_iter_mut() {
        if *x > 0.0 && col[t] > 0.0 {
            *x = ((*x * sum) / (row[w] * col[t])).ln().max(0.0);
        }
    }
    let dims = params
        .word_dims
        .min(n_tech.saturating_sub(1))
        .min(vocab.len() - 1)
        .max(2);
    let pca = Pca::params(dims)
        .fit(&DatasetBase::from(m.clone()))
        .map_err(|e| MapperError::Fit(format!("word PCA: {e}")))?;
    let reduced: Array2<f64> = pca.predict(&m);

    let extra = pretrained.map_or(0, |p| p.dims);
    let width = dims + extra;
    let mut word_vecs: Vec<Vec<f32>> = Vec::with_capacity(vocab.len());
    for (i, (w, _)) in vocab.iter().enumerate() {
        let mut v: Vec<f32> = reduced.row(i).iter().map(|x| *x as f32).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            v.iter_mut().for_each(|x| *x /= n);
        }
        if let Some(p) = pretrained {
            match p.vectors.get(*w) {
                Some(g) => v.extend(g.iter().map(|x| x * params.pretrained_weight)),
                None => v.extend(std::iter::repeat_n(0.0, extra)),
            }
        }
        word_vecs.push(v);
    }

    // Explicit n-gram vectors: the mean of the vectors of the words that contain them (domain part only).
    let (min_n, max_n) = params.ngram_range;
    let mut ngram_acc: BTreeMap<String, (Vec<f32>, usize)> = BTreeMap::new();
    for (i, (w, _)) in vocab.iter().enumerate() {
        let bracketed: Vec<char> = format!("<{w}>").chars().collect();
        for n in min_n as usize..=max_n as usize {
            if bracketed.len() < n {
                break;
            }
            for start in 0..=bracketed.len() - n {
                let g: String = bracketed[start..start + n].iter().collect();
                let e = ngram_acc.entry(g).or_insert_with(|| (vec![0.0; width], 0));
                for (a, x) in e.0.iter_mut().zip(&word_vecs[i][..dims]) {
                    *a += x;
                }
                e.1 += 1;
            }
        }
    }
    let ngrams: Vec<(String, Vec<f32>)> = ngram_acc
        .into_iter()
        .filter(|(_, (_, c))| *c >= 2)
        .map(|(g, (mut v, c))| {
            v.iter_mut().for_each(|x| *x /= c as f32);
            (g, v)
        })
        .collect();

    let rows = vocab.len() + ngrams.len();
    let mut storage = ndarray15::Array2::<f32>::zeros((rows, width));
    for (i, v) in word_vecs
        .iter()
        .chain(ngrams.iter().map(|(_, v)| v))
        .enumerate()
    {
        for (j, x) in v.iter().enumerate() {
            storage[[i, j]] = *x;
        }
    }
    let words: Vec<String> = vocab.iter().map(|(w, _)| w.to_string()).collect();
    let indexer = ExplicitIndexer::new(ngrams.iter().map(|(g, _)| g.clone()).collect::<Vec<_>>());
    let v = ExplicitSubwordVocab::new(words, min_n, max_n, indexer);
    let norms = NdNorms::new(ndarray15::Array1::<f32>::ones(vocab.len()));
    let emb = Embeddings::new(
        None,
        VocabWrap::from(v),
        StorageWrap::from(NdArray::new(storage)),
        norms,
    );
    let probabilities = vocab
        .iter()
        .map(|(w, c)| (w.to_string(), *c as f32 / total.max(1) as f32))
        .collect();
    Ok((WordVectors { emb }, probabilities))
}
