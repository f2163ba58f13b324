//! Where a policy comes from and how it is swapped in: the control-plane subscription (to one
//! of the control-plane replicas), the policy file watch, the persisted copy and the reload
//! that builds and stores a snapshot; the workload certificate fetched from the control
//! plane; and the workload's registration in its service registry.

pub mod certificate;
pub mod client;
pub mod persist;
pub mod register;
pub mod reload;
pub mod replicas;
pub mod subscribe;
pub mod watch_file;
