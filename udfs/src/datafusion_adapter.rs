//! DataFusion `ScalarUDFImpl` adapters: argument checks and scalar/array dispatch around the kernels.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, StringArray};
use arrow::datatypes::DataType;
use datafusion::common::{exec_err, Result, ScalarValue};
use datafusion::logical_expr::registry::FunctionRegistry;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::kernels;

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

/// Every DataFusion function of this crate.
pub fn all_functions() -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::from(StringKernelUdf::new(0, DataType::Int64)),
        ScalarUDF::from(StringKernelUdf::new(1, DataType::Utf8)),
    ]
}

/// Register every function on a DataFusion registry (a `SessionContext` or `SessionState`).
pub fn register_all(registry: &mut dyn FunctionRegistry) -> Result<()> {
    for f in all_functions() {
        registry.register_udf(Arc::new(f))?;
    }
    Ok(())
}
