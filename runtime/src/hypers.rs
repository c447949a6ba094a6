//! Hyperparameter values: the base values of group 0, each parameter group's overrides, the
//! group of every tensor, schedules, and the values the current step uses.

use crate::Schedule;

/// The hyperparameters of an optimizer.
#[derive(Debug, Clone)]
pub(crate) struct Hypers {
    /// Base values of group 0, in declaration order (booleans as 0/1).
    pub(crate) values: Vec<f64>,
    /// Overrides of parameter groups 1, 2, ... (`None`: follows group 0).
    pub(crate) groups: Vec<Vec<Option<f64>>>,
    /// The group of each tensor, `[space][tensor]` (0 unless assigned).
    pub(crate) tensor_groups: Vec<Vec<usize>>,
    /// Schedules by hyperparameter index.
    pub(crate) schedules: Vec<Option<Schedule>>,
    /// The values the current (or next) step uses: base values times their schedules' factors.
    pub(crate) effective: Vec<f64>,
    /// The values of groups 1, 2, ... in the current (or next) step.
    pub(crate) effective_groups: Vec<Vec<f64>>,
}

impl Hypers {
    /// The effective values of every group, group 0 first.
    pub(crate) fn value_sets(&self) -> Vec<&[f64]> {
        std::iter::once(self.effective.as_slice())
            .chain(self.effective_groups.iter().map(Vec::as_slice))
            .collect()
    }
}
