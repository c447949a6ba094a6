//! The IR: a dataflow graph of one optimizer step.
//!
//! Nodes live in an arena ([`Graph`]) and are addressed by [`NodeId`]; children always come before
//! their parents, so the arena order is a topological order. After the `cse` pass the graph is
//! hash-consed: adding a node that already exists returns the existing id.
//!
//! Every node has a [`Ty`] (number or boolean) and a [`Kind`]:
//! - `Scalar`: one value per step, computed on the host in f64 (hyperparameters, `t`, scalar state,
//!   scalar inputs, global reductions, and arithmetic on them);
//! - `Tensor(space)`: one value per tensor of a space (per-tensor reductions and arithmetic on them);
//! - `Element(space)`: one value per element of a space, computed in the buffer's precision inside a
//!   kernel. Element values come only from [`Node::Load`], [`Node::Splat`] and per-element
//!   [`Node::Random`] draws.
//!
//! A [`Program`] holds the graph, the rule's interface ([`RuleInfo`]) and two [`Variant`]s of the
//! step: the first step (`t = 1`, state initializers applied) and every later step. Each variant
//! is a list of stages; each stage stores final values into buffers. The `phases` pass then splits
//! each stage into phases at reductions and groups the work of each phase into one kernel per space.

use crate::random::Dist;
use std::collections::HashMap;
use std::fmt;

/// Index of a node in the [`Graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// Index of a param space (a param and everything shaped like it).
pub type SpaceId = u16;
/// Index into [`RuleInfo::buffers`].
pub type BufId = u16;

/// Value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ty {
    /// A real number.
    Num,
    /// A boolean.
    Bool,
}

/// Where a value varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Once per step.
    Scalar,
    /// Once per tensor of a space.
    Tensor(SpaceId),
    /// Once per element of a space.
    Element(SpaceId),
}

impl Kind {
    /// The least kind that covers both, or `None` when they belong to different spaces.
    pub fn join(self, other: Kind) -> Option<Kind> {
        use Kind::*;
        match (self, other) {
            (Scalar, k) | (k, Scalar) => Some(k),
            (Tensor(a), Tensor(b)) if a == b => Some(Tensor(a)),
            (Element(a), Element(b)) | (Tensor(a), Element(b)) | (Element(a), Tensor(b))
                if a == b =>
            {
                Some(Element(a))
            }
            _ => None,
        }
    }
    /// The space, if the value is per tensor or per element.
    pub fn space(self) -> Option<SpaceId> {
        match self {
            Kind::Scalar => None,
            Kind::Tensor(s) | Kind::Element(s) => Some(s),
        }
    }
}

/// An axis of copies a rule may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    /// The samples of per-sample inputs (`input G: samples`), set by each step's inputs.
    Samples,
    /// The particles of an ensemble (`state X: particles`), set when the program is written out
    /// ([`crate::passes::for_particles`]).
    Particles,
}

impl Axis {
    /// The axis's name in rules (`samples`, `particles`).
    pub fn name(self) -> &'static str {
        match self {
            Axis::Samples => "samples",
            Axis::Particles => "particles",
        }
    }
    /// The prefix of its reductions (`sample`, `particle`).
    pub fn prefix(self) -> &'static str {
        match self {
            Axis::Samples => "sample",
            Axis::Particles => "particle",
        }
    }
}

/// Unary operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum UnOp {
    Neg,
    Not,
    Sqrt,
    Rsqrt,
    Abs,
    Sign,
    Exp,
    Log,
    Log1p,
    Expm1,
    Sigmoid,
    Tanh,
    Floor,
    Ceil,
    Round,
}

/// Binary operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// Floored remainder, like Python's `%`.
    Rem,
    Pow,
    Min,
    Max,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    /// Whether the result is a boolean.
    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge
        )
    }
}

/// Reduction operations. `norm`, `dot`, `mean` and `max_abs` are written with these by lowering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum of the elements.
    Sum,
    /// Largest element (NaN if any element is NaN; 0 for an empty group).
    Max,
}

impl ReduceOp {
    /// Folds one more value (an element or a partial result) into an accumulator, in f64; every
    /// backend and the host combine partials with this.
    pub fn combine(self, acc: f64, v: f64) -> f64 {
        match self {
            ReduceOp::Sum => acc + v,
            ReduceOp::Max => {
                if acc.is_nan() || v.is_nan() {
                    f64::NAN
                } else {
                    acc.max(v)
                }
            }
        }
    }
}

/// A node of the dataflow graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    /// A number, stored as f64 bits so nodes can be hashed.
    Const(u64),
    /// A boolean constant.
    Bool(bool),
    /// A hyperparameter (index into [`RuleInfo::hypers`]).
    Hyper(u16),
    /// The step counter `t` (1 on the first step).
    Step,
    /// A scalar state's value at the start of the step.
    ScalarState(u16),
    /// A scalar input.
    ScalarInput(u16),
    /// A scalar input with a default: its value when the host gives it, else the default's
    /// (`input q: scalar = uniform()`).
    InputOr(u16, NodeId),
    /// Number of elements of a space (`per_tensor`: of each tensor).
    Numel {
        /// The space.
        space: SpaceId,
        /// Per tensor instead of the whole group.
        per_tensor: bool,
    },
    /// The number of tensors of a space (`tensor_count(x)`).
    TensorCount(SpaceId),
    /// A reduction over the tensors of a space of a per-tensor value (`sum(tensor_dot(G, g))`):
    /// one number, computed on the host in tensor order.
    TensorReduce {
        /// Sum or max.
        op: ReduceOp,
        /// The per-tensor value reduced.
        arg: NodeId,
    },
    /// A buffer element: its content after `gen` stages of this step have stored theirs.
    Load {
        /// The buffer.
        buf: BufId,
        /// Stages completed before the load.
        gen: u16,
    },
    /// A scalar or per-tensor value broadcast to every element of a space.
    Splat(SpaceId, NodeId),
    /// `op(a)`.
    Unary(UnOp, NodeId),
    /// `op(a, b)`.
    Binary(BinOp, NodeId, NodeId),
    /// `if c { a } else { b }`.
    Select(NodeId, NodeId, NodeId),
    /// A reduction over every element of a space (or of each tensor).
    Reduce {
        /// Sum or max.
        op: ReduceOp,
        /// Per tensor instead of the whole group.
        per_tensor: bool,
        /// The per-element value reduced.
        arg: NodeId,
    },
    /// The number of copies along the rule's axis: `samples` (the step's sample-axis inputs) or
    /// `particles` (the ensemble). Only in a program's axis form: [`crate::passes::unroll`]
    /// replaces it by the count.
    Count(Axis),
    /// A reduction over the rule's axis (`sample_sum`, `particle_max`, ...) of a value that varies
    /// along it. Only in a program's axis form: [`crate::passes::unroll`] replaces it by one
    /// operation per copy, in copy order.
    AxisReduce {
        /// The axis.
        axis: Axis,
        /// Sum or max.
        op: ReduceOp,
        /// The value reduced.
        arg: NodeId,
    },
    /// A draw per particle and element (a draw written in an assignment to a per-particle
    /// state). Only in a program's axis form: [`crate::passes::unroll`] gives particle `j` the
    /// draw of stream [`crate::random::particle_stream`]`(stream, j)`.
    ParticleDraw {
        /// Uniform or normal.
        dist: Dist,
        /// The draw's stream, before the particle's.
        stream: u32,
        /// Where it varies (per element of a space).
        kind: Kind,
    },
    /// A random draw ([`crate::random`]): one value per element, per tensor or per step, as
    /// `kind` says, from stream `stream`, keyed by the optimizer's seed or by the value of `seed`
    /// (a scalar).
    Random {
        /// Uniform or normal.
        dist: Dist,
        /// The draw stream ([`crate::random::inline_stream`], [`crate::random::named_stream`]).
        stream: u32,
        /// Where it varies.
        kind: Kind,
        /// The seed argument, if any.
        seed: Option<NodeId>,
    },
}

impl Node {
    /// A number constant.
    pub fn num(v: f64) -> Node {
        Node::Const(v.to_bits())
    }
    /// The value of a number constant.
    pub fn as_num(&self) -> Option<f64> {
        match self {
            Node::Const(b) => Some(f64::from_bits(*b)),
            _ => None,
        }
    }
    /// The children, in order.
    pub fn children(&self) -> Vec<NodeId> {
        match *self {
            Node::Splat(_, a)
            | Node::Unary(_, a)
            | Node::Reduce { arg: a, .. }
            | Node::AxisReduce { arg: a, .. }
            | Node::TensorReduce { arg: a, .. }
            | Node::InputOr(_, a) => vec![a],
            Node::Binary(_, a, b) => vec![a, b],
            Node::Select(c, a, b) => vec![c, a, b],
            Node::Random { seed, .. } => seed.into_iter().collect(),
            _ => Vec::new(),
        }
    }
    /// The same node with each child replaced by `f(child)`.
    pub fn map_children(&self, mut f: impl FnMut(NodeId) -> NodeId) -> Node {
        match *self {
            Node::Splat(s, a) => Node::Splat(s, f(a)),
            Node::InputOr(i, a) => Node::InputOr(i, f(a)),
            Node::Unary(op, a) => Node::Unary(op, f(a)),
            Node::Reduce {
                op,
                per_tensor,
                arg,
            } => Node::Reduce {
                op,
                per_tensor,
                arg: f(arg),
            },
            Node::AxisReduce { axis, op, arg } => Node::AxisReduce {
                axis,
                op,
                arg: f(arg),
            },
            Node::TensorReduce { op, arg } => Node::TensorReduce { op, arg: f(arg) },
            Node::Binary(op, a, b) => Node::Binary(op, f(a), f(b)),
            Node::Select(c, a, b) => Node::Select(f(c), f(a), f(b)),
            Node::Random {
                dist,
                stream,
                kind,
                seed,
            } => Node::Random {
                dist,
                stream,
                kind,
                seed: seed.map(f),
            },
            n => n,
        }
    }
}

/// The arena of nodes, with their types and kinds.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    nodes: Vec<Node>,
    tys: Vec<Ty>,
    kinds: Vec<Kind>,
    interned: HashMap<Node, NodeId>,
    hash_consing: bool,
}

/// Facts about leaves that a graph needs to type them.
pub trait LeafTypes {
    /// Type of a hyperparameter.
    fn hyper_ty(&self, h: u16) -> Ty;
    /// Space of a buffer.
    fn buf_space(&self, b: BufId) -> SpaceId;
}

impl Graph {
    /// An empty graph; `hash_consing` merges equal nodes.
    pub fn new(hash_consing: bool) -> Self {
        Graph {
            hash_consing,
            ..Default::default()
        }
    }
    /// Whether equal nodes are merged.
    pub fn is_hash_consed(&self) -> bool {
        self.hash_consing
    }
    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    /// Whether the graph has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
    /// The node behind an id.
    pub fn node(&self, id: NodeId) -> Node {
        self.nodes[id.0 as usize]
    }
    /// Its type.
    pub fn ty(&self, id: NodeId) -> Ty {
        self.tys[id.0 as usize]
    }
    /// Its kind.
    pub fn kind(&self, id: NodeId) -> Kind {
        self.kinds[id.0 as usize]
    }
    /// Whether a node is a number constant equal to `v`.
    pub fn is_num(&self, id: NodeId, v: f64) -> bool {
        self.node(id).as_num() == Some(v)
    }

    /// Adds a node (or finds the equal one when hash-consing), computing its type and kind.
    pub fn add(&mut self, node: Node, leaves: &dyn LeafTypes) -> NodeId {
        if self.hash_consing {
            if let Some(&id) = self.interned.get(&node) {
                return id;
            }
        }
        let (ty, kind) = self.type_of(&node, leaves);
        let id = NodeId(self.nodes.len() as u32);
        self.nodes.push(node);
        self.tys.push(ty);
        self.kinds.push(kind);
        if self.hash_consing {
            self.interned.insert(node, id);
        }
        id
    }

    fn type_of(&self, node: &Node, leaves: &dyn LeafTypes) -> (Ty, Kind) {
        let join = |a: NodeId, b: NodeId| self.kind(a).join(self.kind(b)).unwrap_or(self.kind(a));
        match *node {
            Node::Const(_)
            | Node::Step
            | Node::Count(_)
            | Node::TensorCount(_)
            | Node::TensorReduce { .. }
            | Node::ScalarState(_)
            | Node::ScalarInput(_)
            | Node::InputOr(..) => (Ty::Num, Kind::Scalar),
            Node::Bool(_) => (Ty::Bool, Kind::Scalar),
            Node::Hyper(h) => (leaves.hyper_ty(h), Kind::Scalar),
            Node::Numel { space, per_tensor } => (
                Ty::Num,
                if per_tensor {
                    Kind::Tensor(space)
                } else {
                    Kind::Scalar
                },
            ),
            Node::Load { buf, .. } => (Ty::Num, Kind::Element(leaves.buf_space(buf))),
            Node::Random { kind, .. } => (Ty::Num, kind),
            Node::AxisReduce { arg, .. } => (Ty::Num, self.kind(arg)),
            Node::ParticleDraw { kind, .. } => (Ty::Num, kind),
            Node::Splat(s, a) => (self.ty(a), Kind::Element(s)),
            Node::Unary(op, a) => (
                if op == UnOp::Not { Ty::Bool } else { Ty::Num },
                self.kind(a),
            ),
            Node::Binary(op, a, b) => (
                if op.is_comparison() || matches!(op, BinOp::And | BinOp::Or) {
                    Ty::Bool
                } else {
                    Ty::Num
                },
                join(a, b),
            ),
            Node::Select(c, a, b) => {
                let k = join(a, b);
                let k = self.kind(c).join(k).unwrap_or(k);
                (self.ty(a), k)
            }
            Node::Reduce {
                per_tensor, arg, ..
            } => {
                let space = self.kind(arg).space().unwrap_or(0);
                (
                    Ty::Num,
                    if per_tensor {
                        Kind::Tensor(space)
                    } else {
                        Kind::Scalar
                    },
                )
            }
        }
    }
}

/// A hyperparameter of a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct HyperInfo {
    /// Its name.
    pub name: String,
    /// Number or boolean.
    pub ty: Ty,
    /// Default value (booleans as 0/1).
    pub default: f64,
    /// Its `///` documentation.
    pub doc: String,
    /// The values the host may set, if the rule declares a range.
    pub range: Option<HyperRange>,
}

/// A hyperparameter's allowed values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HyperRange {
    /// Lower bound (may be -inf).
    pub lo: f64,
    /// Whether `lo` is allowed.
    pub lo_closed: bool,
    /// Upper bound (may be inf).
    pub hi: f64,
    /// Whether `hi` is allowed.
    pub hi_closed: bool,
}

impl HyperRange {
    /// Whether `v` is in the range.
    pub fn contains(&self, v: f64) -> bool {
        (if self.lo_closed {
            v >= self.lo
        } else {
            v > self.lo
        }) && (if self.hi_closed {
            v <= self.hi
        } else {
            v < self.hi
        })
    }
}

impl fmt::Display for HyperRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = |v: f64| {
            if v.is_infinite() {
                if v > 0.0 {
                    "inf".to_string()
                } else {
                    "-inf".to_string()
                }
            } else {
                format!("{v}")
            }
        };
        write!(
            f,
            "{}{}, {}{}",
            if self.lo_closed { "[" } else { "(" },
            b(self.lo),
            b(self.hi),
            if self.hi_closed { "]" } else { ")" }
        )
    }
}

/// What a buffer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BufRole {
    /// A parameter the rule updates (the host owns it).
    Param,
    /// A per-element input from the host.
    Input,
    /// Per-element optimizer state.
    State,
    /// A per-element output for the host (written by `out`).
    Output,
}

/// A per-element buffer of a rule: one array per tensor of its space.
#[derive(Debug, Clone, PartialEq)]
pub struct BufInfo {
    /// Its name in the rule.
    pub name: String,
    /// Param, input, state or output.
    pub role: BufRole,
    /// The space it is shaped like.
    pub space: SpaceId,
    /// Whether it has one copy per sample or particle ([`RuleInfo::axis`]): an input the host
    /// gives as `[samples, ...shape]` per tensor, or a per-particle state or input. Only in a
    /// program's axis form.
    pub axis: bool,
}

/// The interface of a compiled rule: everything a runtime needs to set it up.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleInfo {
    /// The rule's name.
    pub name: String,
    /// Its `///` documentation.
    pub doc: String,
    /// Hyperparameters, in declaration order.
    pub hypers: Vec<HyperInfo>,
    /// Param spaces: the name of the param that defines each.
    pub spaces: Vec<String>,
    /// Per-element buffers; params come first, in space order (buffer `i < spaces.len()` is the param of space `i`).
    pub buffers: Vec<BufInfo>,
    /// Scalar state names.
    pub scalar_states: Vec<String>,
    /// Scalar input names.
    pub scalar_inputs: Vec<String>,
    /// The rule's axis of copies, if it has one: the samples of per-sample inputs, or particles.
    pub axis: Option<Axis>,
    /// The scalar inputs with one value per copy (`input f: particles scalar`). Only in a
    /// program's axis form.
    pub axis_scalars: Vec<u16>,
    /// The scalar states that are scalar outputs (`out NAME = <scalar>`): set by every step,
    /// read by the host, never by the rule.
    pub scalar_outs: Vec<u16>,
    /// Stage names (one stage named `step` for rules without stages).
    pub stages: Vec<String>,
}

impl RuleInfo {
    /// Finds a buffer by name.
    pub fn buffer(&self, name: &str) -> Option<BufId> {
        self.buffers
            .iter()
            .position(|b| b.name == name)
            .map(|i| i as BufId)
    }
    /// Finds a hyperparameter by name.
    pub fn hyper(&self, name: &str) -> Option<usize> {
        self.hypers.iter().position(|h| h.name == name)
    }
    /// The per-element inputs (gradients, ...), in buffer order, with their ids.
    pub fn inputs(&self) -> impl Iterator<Item = (BufId, &BufInfo)> + '_ {
        self.buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.role == BufRole::Input)
            .map(|(i, b)| (i as BufId, b))
    }
    /// Whether buffer `b` is a per-element input.
    pub fn is_input(&self, b: BufId) -> bool {
        self.buffers[b as usize].role == BufRole::Input
    }
}

impl LeafTypes for RuleInfo {
    fn hyper_ty(&self, h: u16) -> Ty {
        self.hypers[h as usize].ty
    }
    fn buf_space(&self, b: BufId) -> SpaceId {
        self.buffers[b as usize].space
    }
}

/// One stage of one step variant.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stage {
    /// Final values stored at the end of the stage: params, states and outputs that changed.
    pub stores: Vec<(BufId, NodeId)>,
    /// Kernels, filled in by the `phases` pass: the stage runs `phases[0]`, then `phases[1]`, ...
    pub phases: Vec<Phase>,
}

/// One pass over memory: the kernels of different spaces in a phase are independent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Phase {
    /// One kernel per space with work in this phase.
    pub kernels: Vec<Kernel>,
}

/// A fused loop over every element of every tensor of one space.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Kernel {
    /// The space it iterates over.
    pub space: SpaceId,
    /// Scalar and per-tensor values the body reads, computed on the host before the kernel runs.
    pub uniforms: Vec<NodeId>,
    /// Buffers it reads (`Load` nodes), in node order.
    pub loads: Vec<NodeId>,
    /// Per-element nodes it computes, in topological order (loads included).
    pub body: Vec<NodeId>,
    /// Values it stores.
    pub stores: Vec<(BufId, NodeId)>,
    /// Reductions it accumulates: the `Reduce` node (whose result later work reads) and the
    /// per-element argument as computed in this kernel.
    pub reductions: Vec<(NodeId, NodeId)>,
}

/// The first step (`t = 1`, initializers applied) or every later step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Variant {
    /// Stages in order.
    pub stages: Vec<Stage>,
    /// New values of scalar states, applied at the end of the step.
    pub scalar_updates: Vec<(u16, NodeId)>,
}

/// A compiled rule: interface, graph and the two step variants.
#[derive(Debug, Clone)]
pub struct Program {
    /// The interface.
    pub info: RuleInfo,
    /// All nodes of both variants.
    pub graph: Graph,
    /// `[first step, later steps]`.
    pub variants: [Variant; 2],
    /// For a rule with an axis ([`RuleInfo::axis`]): the rule as lowered, with its axis
    /// ([`Node::Count`], [`Node::AxisReduce`], [`Node::ParticleDraw`], buffers with
    /// [`BufInfo::axis`]), and the number of copies this program was written out for
    /// ([`crate::passes::unroll`]).
    pub axis_form: Option<(std::sync::Arc<Program>, usize)>,
}

impl Program {
    /// Adds a node to the program's graph.
    pub fn add(&mut self, node: Node) -> NodeId {
        self.graph.add(node, &self.info)
    }

    /// All roots: stores and scalar updates of both variants.
    pub fn roots(&self) -> Vec<NodeId> {
        let mut roots = Vec::new();
        for v in &self.variants {
            for s in &v.stages {
                roots.extend(s.stores.iter().map(|&(_, n)| n));
                for p in &s.phases {
                    for k in &p.kernels {
                        roots.extend(k.stores.iter().map(|&(_, n)| n));
                        roots.extend(k.reductions.iter().flat_map(|&(r, a)| [r, a]));
                        roots.extend(k.uniforms.iter().copied());
                    }
                }
            }
            roots.extend(v.scalar_updates.iter().map(|&(_, n)| n));
        }
        roots
    }

    /// Rebuilds the graph from the roots, applying `rewrite` to each reachable node (children
    /// first, already rewritten). Unreachable nodes disappear. `rewrite` receives the new program
    /// state (for adding nodes) and the node with its children remapped.
    pub fn rebuild(
        &mut self,
        hash_consing: bool,
        mut rewrite: impl FnMut(&mut Rebuilder<'_>, Node) -> NodeId,
    ) {
        self.rebuild_with_ids(hash_consing, |rb, _, node| rewrite(rb, node));
    }

    /// Like [`Program::rebuild`], also giving the rewrite each node's id in the old graph.
    pub fn rebuild_with_ids(
        &mut self,
        hash_consing: bool,
        mut rewrite: impl FnMut(&mut Rebuilder<'_>, NodeId, Node) -> NodeId,
    ) {
        let old = std::mem::replace(&mut self.graph, Graph::new(hash_consing));
        let mut memo: Vec<Option<NodeId>> = vec![None; old.len()];
        let mut rb = Rebuilder {
            graph: &mut self.graph,
            info: &self.info,
        };
        let mut map = |root: NodeId, rb: &mut Rebuilder<'_>| -> NodeId {
            // Iterative post-order walk: graphs of long rules are deep.
            let mut stack = vec![(root, false)];
            while let Some((id, expanded)) = stack.pop() {
                if memo[id.0 as usize].is_some() {
                    continue;
                }
                let node = old.node(id);
                if !expanded {
                    stack.push((id, true));
                    for c in node.children() {
                        if memo[c.0 as usize].is_none() {
                            stack.push((c, false));
                        }
                    }
                } else {
                    let mut mapped =
                        node.map_children(|c| memo[c.0 as usize].expect("child mapped first"));
                    // A rewrite may turn a reduction's per-element argument into a scalar or
                    // per-tensor value (a select folded to its scalar branch): the reduction
                    // still runs over the elements of its space, so broadcast the value back.
                    if let (
                        Node::Reduce { arg: old_arg, .. },
                        Node::Reduce {
                            op,
                            per_tensor,
                            arg,
                        },
                    ) = (node, mapped)
                    {
                        if let (Kind::Element(space), false) = (
                            old.kind(old_arg),
                            matches!(rb.graph.kind(arg), Kind::Element(_)),
                        ) {
                            let arg = rb.add(Node::Splat(space, arg));
                            mapped = Node::Reduce {
                                op,
                                per_tensor,
                                arg,
                            };
                        }
                    }
                    memo[id.0 as usize] = Some(rewrite(rb, id, mapped));
                }
            }
            memo[root.0 as usize].expect("root mapped")
        };
        for v in &mut self.variants {
            for s in &mut v.stages {
                for (_, n) in &mut s.stores {
                    *n = map(*n, &mut rb);
                }
                for p in &mut s.phases {
                    for k in &mut p.kernels {
                        for n in k.uniforms.iter_mut().chain(&mut k.loads).chain(&mut k.body) {
                            *n = map(*n, &mut rb);
                        }
                        for (r, a) in &mut k.reductions {
                            *r = map(*r, &mut rb);
                            *a = map(*a, &mut rb);
                        }
                        for (_, n) in &mut k.stores {
                            *n = map(*n, &mut rb);
                        }
                    }
                }
            }
            for (_, n) in &mut v.scalar_updates {
                *n = map(*n, &mut rb);
            }
        }
    }
}

/// What a rewrite sees while the graph is rebuilt.
#[derive(Debug)]
pub struct Rebuilder<'a> {
    /// The graph being built.
    pub graph: &'a mut Graph,
    /// The rule's interface.
    pub info: &'a RuleInfo,
}

impl Rebuilder<'_> {
    /// Adds a node to the new graph.
    pub fn add(&mut self, node: Node) -> NodeId {
        self.graph.add(node, self.info)
    }
    /// The node behind a new id.
    pub fn node(&self, id: NodeId) -> Node {
        self.graph.node(id)
    }
}
