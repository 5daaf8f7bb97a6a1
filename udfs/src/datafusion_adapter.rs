//! DataFusion `ScalarUDFImpl` adapters: argument checks and scalar/array dispatch around the kernels.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, StringArray};
use arrow::datatypes::DataType;
use datafusion::common::{exec_err, Result, ScalarValue};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::registry::FunctionRegistry;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::kernels;
use crate::mapping_kernels;
pub use crate::model_slot::LazyMapper;

type Kernel = fn(&StringArray) -> ArrayRef;

/// A one-string-argument function backed by a kernel; the two functions of the spine share it.
#[derive(Debug, PartialEq, Eq, Hash)]
struct StringKernelUdf {
    name: &'static str,
    returns: DataType,
    signature: Signature,
    kernel_id: usize,
}

const KERNELS: [(&str, Kernel); 2] = [
    ("attack_version_key", kernels::attack_version_key),
    ("technique_parent", kernels::technique_parent),
];

impl StringKernelUdf {
    fn new(kernel_id: usize, returns: DataType) -> Self {
        Self {
            name: KERNELS[kernel_id].0,
            returns,
            signature: Signature::string(1, Volatility::Immutable),
            kernel_id,
        }
    }
}

impl ScalarUDFImpl for StringKernelUdf {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.returns.clone())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let kernel = KERNELS[self.kernel_id].1;
        let [arg] = args.args.as_slice() else {
            return exec_err!("{} takes exactly one argument", self.name);
        };
        match arg {
            ColumnarValue::Array(a) => {
                let a = arrow::compute::cast(a, &DataType::Utf8)?;
                Ok(ColumnarValue::Array(kernel(a.as_string::<i32>())))
            }
            ColumnarValue::Scalar(s) => {
                // Fast path: evaluate a literal once instead of once per row.
                let s = s.cast_to(&DataType::Utf8)?;
                let a = s.to_array_of_size(1)?;
                let out = kernel(a.as_string::<i32>());
                Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum MapKind {
    MapTechnique,
    MapTechniques,
    TechniqueScore,
    ExplainMapping,
    MapReport,
}

#[derive(Debug)]
struct MappingUdf {
    kind: MapKind,
    signature: Signature,
    mapper: Arc<LazyMapper>,
}

impl PartialEq for MappingUdf {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && Arc::ptr_eq(&self.mapper, &other.mapper)
    }
}
impl Eq for MappingUdf {}
impl std::hash::Hash for MappingUdf {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
        (Arc::as_ptr(&self.mapper) as usize).hash(state);
    }
}

impl ScalarUDFImpl for MappingUdf {
    fn name(&self) -> &str {
        match self.kind {
            MapKind::MapTechnique => "map_technique",
            MapKind::MapTechniques => "map_techniques",
            MapKind::TechniqueScore => "technique_score",
            MapKind::ExplainMapping => "explain_mapping",
            MapKind::MapReport => "map_report",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            MapKind::MapTechnique | MapKind::ExplainMapping => DataType::Utf8,
            MapKind::MapTechniques => mapping_kernels::ranked_list_type(),
            MapKind::MapReport => mapping_kernels::report_list_type(),
            MapKind::TechniqueScore => DataType::Float64,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let text = arrow::compute::cast(&arrays[0], &DataType::Utf8)?;
        let text = text.as_string::<i32>();
        let m = self.mapper.get().map_err(DataFusionError::Execution)?;
        let ext = |e: mapping_kernels::KernelError| DataFusionError::Execution(e.to_string());
        let out = match self.kind {
            MapKind::MapTechnique => {
                mapping_kernels::map_technique(&m, text, self.mapper.threshold())
            }
            MapKind::ExplainMapping => {
                mapping_kernels::explain_mapping(&m, text, self.mapper.threshold())
            }
            MapKind::MapReport => mapping_kernels::map_report(&m, text, self.mapper.threshold()),
            MapKind::MapTechniques => {
                let k = mapping_kernels::k_argument(&arrays[1]).map_err(ext)?;
                mapping_kernels::map_techniques(&m, text, &k).map_err(ext)?
            }
            MapKind::TechniqueScore => {
                let ids = arrow::compute::cast(&arrays[1], &DataType::Utf8)?;
                mapping_kernels::technique_score(&m, text, ids.as_string::<i32>()).map_err(ext)?
            }
        };
        Ok(ColumnarValue::Array(out))
    }
}

/// Every DataFusion function of this crate; the mapping functions use `mapper`.
pub fn all_functions(mapper: Arc<LazyMapper>) -> Vec<ScalarUDF> {
    let mapping = |kind, args| {
        ScalarUDF::from(MappingUdf {
            kind,
            signature: Signature::any(args, Volatility::Immutable),
            mapper: mapper.clone(),
        })
    };
    vec![
        ScalarUDF::from(StringKernelUdf::new(0, DataType::Int64)),
        ScalarUDF::from(StringKernelUdf::new(1, DataType::Utf8)),
        mapping(MapKind::MapTechnique, 1),
        mapping(MapKind::MapTechniques, 2),
        mapping(MapKind::TechniqueScore, 2),
        mapping(MapKind::ExplainMapping, 1),
        mapping(MapKind::MapReport, 1),
    ]
}

/// Register every function on a DataFusion registry (a `SessionContext` or `SessionState`).
pub fn register_all(registry: &mut dyn FunctionRegistry, mapper: Arc<LazyMapper>) -> Result<()> {
    for f in all_functions(mapper) {
        registry.register_udf(Arc::new(f))?;
    }
    Ok(())
}
