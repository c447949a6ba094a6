//! What the host hands a step: named tensors, inputs (host slices or device addresses).

use std::collections::HashMap;

/// Inputs of one stage: per-element inputs by name (one array per tensor) and scalar inputs by name.
#[derive(Debug, Clone)]
pub struct Inputs<'a, T> {
    /// Per-element inputs.
    pub tensors: HashMap<String, Vec<&'a [T]>>,
    /// Scalar inputs.
    pub scalars: HashMap<String, f64>,
    /// The step's number of samples, for a rule whose sample-axis inputs come in a later stage
    /// than the first (run stage by stage); otherwise read from the inputs' lengths.
    pub samples: Option<usize>,
}

impl<T> Default for Inputs<'_, T> {
    fn default() -> Self {
        Inputs {
            tensors: HashMap::new(),
            scalars: HashMap::new(),
            samples: None,
        }
    }
}

impl<'a, T> Inputs<'a, T> {
    /// Adds a per-element input.
    pub fn tensor(mut self, name: &str, data: Vec<&'a [T]>) -> Self {
        self.tensors.insert(name.to_string(), data);
        self
    }
    /// Adds a scalar input.
    pub fn scalar(mut self, name: &str, v: f64) -> Self {
        self.scalars.insert(name.to_string(), v);
        self
    }
    /// Sets the step's number of samples (see [`Inputs::samples`](Inputs#structfield.samples)).
    pub fn with_samples(mut self, n: usize) -> Self {
        self.samples = Some(n);
        self
    }
    /// Adds a scalar input with one value per particle (`input f: particles scalar`):
    /// `values[j]` is particle `j`'s (named `f`, `f[1]`, `f[2]`, ... in the program).
    pub fn per_particle(mut self, name: &str, values: &[f64]) -> Self {
        for (j, &v) in values.iter().enumerate() {
            self.scalars
                .insert(optc_compiler::passes::unroll::copy_name(name, j), v);
        }
        self
    }
}

/// A parameter tensor registered with an optimizer: its name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The name (unique within the optimizer).
    pub name: String,
    /// The shape; the tensor holds the product of its dimensions (1 for a 0-d tensor).
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A named tensor of this shape.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// Its number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor given for an input: host data (its length is checked) or a device address (its length
/// is the caller's contract).
pub(crate) trait GivenTensor {
    /// Its number of elements, when known.
    fn elems(&self) -> Option<usize>;
}

impl<T> GivenTensor for &[T] {
    fn elems(&self) -> Option<usize> {
        Some(self.len())
    }
}

impl<T> GivenTensor for &mut [T] {
    fn elems(&self) -> Option<usize> {
        Some(self.len())
    }
}

impl GivenTensor for u64 {
    fn elems(&self) -> Option<usize> {
        None
    }
}

/// Device addresses of per-element inputs (one per tensor) and scalar inputs, for
/// [`crate::Optimizer::step_device`].
#[derive(Debug, Clone, Default)]
pub struct DeviceInputs {
    /// Per-element inputs by name: the device address of each tensor's data.
    pub tensors: HashMap<String, Vec<u64>>,
    /// Scalar inputs by name.
    pub scalars: HashMap<String, f64>,
    /// The number of samples the sample-axis inputs hold (`[samples, ...shape]` per tensor,
    /// samples first); needed when one is given, since device addresses carry no length.
    pub samples: Option<usize>,
}

impl DeviceInputs {
    /// Sets the number of samples of the sample-axis inputs.
    pub fn samples(mut self, n: usize) -> Self {
        self.samples = Some(n);
        self
    }
    /// Adds a per-element input.
    pub fn tensor(mut self, name: &str, ptrs: Vec<u64>) -> Self {
        self.tensors.insert(name.to_string(), ptrs);
        self
    }
    /// Adds a scalar input.
    pub fn scalar(mut self, name: &str, v: f64) -> Self {
        self.scalars.insert(name.to_string(), v);
        self
    }
}
