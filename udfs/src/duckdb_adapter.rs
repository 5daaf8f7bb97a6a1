//! DuckDB adapters (duckdb-rs `VArrowScalar`) around the same Arrow kernels DataFusion uses: the
//! embedded engine and the loadable extension register these. duckdb-rs speaks arrow 60, the
//! kernels arrow 59; arrays cross through the Arrow C Data Interface (no copy of the buffers).

use std::error::Error;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::DataType;
use duckdb::arrow as a60;
use duckdb::vscalar::{ArrowFunctionSignature, VArrowScalar};

use crate::model_slot::LazyMapper;
use crate::{kernels, mapping_kernels};

type BoxError = Box<dyn Error>;

/// An arrow-60 array as an arrow-59 array.
#[allow(unsafe_code)]
pub fn from_duckdb(a: &dyn a60::array::Array) -> Result<ArrayRef, BoxError> {
    let (array, schema) = a60::ffi::to_ffi(&a.to_data())?;
    // SAFETY: FFI_ArrowArray and FFI_ArrowSchema are the #[repr(C)] structs of the Arrow C Data
    // Interface in both arrow versions (same layout, same release callbacks), so a value of one
    // crate's type is a valid value of the other's; `from_ffi` then takes ownership as the C
    // interface prescribes.
    let (array, schema) = unsafe {
        (
            std::mem::transmute::<a60::ffi::FFI_ArrowArray, arrow::ffi::FFI_ArrowArray>(array),
            std::mem::transmute::<a60::ffi::FFI_ArrowSchema, arrow::ffi::FFI_ArrowSchema>(schema),
        )
    };
    let data = unsafe { arrow::ffi::from_ffi(array, &schema) }?;
    Ok(arrow::array::make_array(data))
}

/// An arrow-59 array as an arrow-60 array.
#[allow(unsafe_code)]
pub fn to_duckdb(a: &dyn Array) -> Result<a60::array::ArrayRef, BoxError> {
    let (array, schema) = arrow::ffi::to_ffi(&a.to_data())?;
    // SAFETY: as in `from_duckdb`, the other way round.
    let (array, schema) = unsafe {
        (
            std::mem::transmute::<arrow::ffi::FFI_ArrowArray, a60::ffi::FFI_ArrowArray>(array),
            std::mem::transmute::<arrow::ffi::FFI_ArrowSchema, a60::ffi::FFI_ArrowSchema>(schema),
        )
    };
    let data = unsafe { a60::ffi::from_ffi(array, &schema) }?;
    Ok(a60::array::make_array(data))
}

/// An arrow-59 type as an arrow-60 type (through the C schema).
#[allow(unsafe_code)]
pub fn type_to_duckdb(t: &DataType) -> a60::datatypes::DataType {
    let schema = arrow::ffi::FFI_ArrowSchema::try_from(t).expect("kernel types export");
    // SAFETY: see `from_duckdb`.
    let schema = unsafe {
        std::mem::transmute::<arrow::ffi::FFI_ArrowSchema, a60::ffi::FFI_ArrowSchema>(schema)
    };
    a60::datatypes::DataType::try_from(&schema).expect("kernel types import")
}

fn text_column(input: &a60::record_batch::RecordBatch, i: usize) -> Result<ArrayRef, BoxError> {
    let a = from_duckdb(input.column(i).as_ref())?;
    Ok(arrow::compute::cast(&a, &DataType::Utf8)?)
}

const MAP_TECHNIQUE: u8 = 0;
const MAP_TECHNIQUES: u8 = 1;
const TECHNIQUE_SCORE: u8 = 2;
const EXPLAIN_MAPPING: u8 = 3;
const USE_MODEL: u8 = 4;
const VERSION_KEY: u8 = 5;
const TECHNIQUE_PARENT: u8 = 6;
const MAP_REPORT: u8 = 7;

/// One threatlake function in DuckDB; `F` picks which.
pub struct Function<const F: u8>;

impl<const F: u8> VArrowScalar for Function<F> {
    type State = Arc<LazyMapper>;

    fn invoke(
        state: &Self::State,
        input: a60::record_batch::RecordBatch,
    ) -> Result<a60::array::ArrayRef, BoxError> {
        let text = text_column(&input, 0)?;
        let text = text.as_string::<i32>();
        let out: ArrayRef = match F {
            VERSION_KEY => kernels::attack_version_key(text),
            TECHNIQUE_PARENT => kernels::technique_parent(text),
            USE_MODEL => {
                let mut out = Vec::with_capacity(text.len());
                for dir in text.iter() {
                    out.push(match dir {
                        None => None,
                        Some(d) => {
                            let m = state.use_dir(d)?;
                            Some(format!(
                                "threatlake model {}-{} ({} techniques) from {d}",
                                m.model.domain,
                                m.model.attack_version,
                                m.model.techniques.len()
                            ))
                        }
                    });
                }
                Arc::new(arrow::array::StringArray::from(out))
            }
            _ => {
                let m = state.get()?;
                match F {
                    MAP_TECHNIQUE => mapping_kernels::map_technique(&m, text, state.threshold()),
                    EXPLAIN_MAPPING => {
                        mapping_kernels::explain_mapping(&m, text, state.threshold())
                    }
                    MAP_REPORT => mapping_kernels::map_report(&m, text, state.threshold()),
                    MAP_TECHNIQUES => {
                        let k = from_duckdb(input.column(1).as_ref())?;
                        let k = mapping_kernels::k_argument(&k)?;
                        mapping_kernels::map_techniques(&m, text, &k)?
                    }
                    TECHNIQUE_SCORE => {
                        let ids = text_column(&input, 1)?;
                        mapping_kernels::technique_score(&m, text, ids.as_string::<i32>())?
                    }
                    _ => unreachable!("function ids are the constants above"),
                }
            }
        };
        to_duckdb(out.as_ref())
    }

    fn signatures() -> Vec<ArrowFunctionSignature> {
        let t = |d: DataType| type_to_duckdb(&d);
        let text = || t(DataType::Utf8);
        match F {
            MAP_TECHNIQUE | EXPLAIN_MAPPING | USE_MODEL | TECHNIQUE_PARENT => {
                vec![ArrowFunctionSignature::exact(vec![text()], text())]
            }
            VERSION_KEY => vec![ArrowFunctionSignature::exact(
                vec![text()],
                t(DataType::Int64),
            )],
            // k as integer, float or text: the kernel checks it (2.7 and 'abc' are errors, as on
            // DataFusion) instead of DuckDB casting text or rounding a fraction first.
            MAP_TECHNIQUES => [DataType::Int64, DataType::Float64, DataType::Utf8]
                .into_iter()
                .map(|k| {
                    ArrowFunctionSignature::exact(
                        vec![text(), t(k)],
                        t(mapping_kernels::ranked_list_type()),
                    )
                })
                .collect(),
            TECHNIQUE_SCORE => vec![ArrowFunctionSignature::exact(
                vec![text(), text()],
                t(DataType::Float64),
            )],
            MAP_REPORT => vec![ArrowFunctionSignature::exact(
                vec![text()],
                t(mapping_kernels::report_list_type()),
            )],
            _ => unreachable!("function ids are the constants above"),
        }
    }

    fn volatile() -> bool {
        F == USE_MODEL
    }
}

/// The functions by name, as `register` adds them.
pub const NAMES: [&str; 8] = [
    "map_technique",
    "map_techniques",
    "technique_score",
    "explain_mapping",
    "threatlake_use_model",
    "attack_version_key",
    "technique_parent",
    "map_report",
];

/// Register every threatlake function on a DuckDB connection; the mapping functions share `mapper`
/// (`threatlake_use_model(dir)` switches it for the whole database).
pub fn register(con: &duckdb::Connection, mapper: &Arc<LazyMapper>) -> duckdb::Result<()> {
    con.register_scalar_function_with_state::<Function<MAP_TECHNIQUE>>(NAMES[0], mapper)?;
    con.register_scalar_function_with_state::<Function<MAP_TECHNIQUES>>(NAMES[1], mapper)?;
    con.register_scalar_function_with_state::<Function<TECHNIQUE_SCORE>>(NAMES[2], mapper)?;
    con.register_scalar_function_with_state::<Function<EXPLAIN_MAPPING>>(NAMES[3], mapper)?;
    con.register_scalar_function_with_state::<Function<USE_MODEL>>(NAMES[4], mapper)?;
    con.register_scalar_function_with_state::<Function<VERSION_KEY>>(NAMES[5], mapper)?;
    con.register_scalar_function_with_state::<Function<TECHNIQUE_PARENT>>(NAMES[6], mapper)?;
    con.register_scalar_function_with_state::<Function<MAP_REPORT>>(NAMES[7], mapper)?;
    Ok(())
}
