//! The social security card's domain model, pure and free of I/O: identities (R1), card and account
//! numbers (R4, R5), the partner banks and per-city policy as configuration, and the three state machines
//! of a card (physical card, social function, financial function) with the rules that move them.
//!
//! This crate must never touch a database, a clock or the network: callers pass "now" in, and every rule
//! answers with a new state or a [`Rejection`] that says which rule refused and why.

pub mod bank;
pub mod card;
pub mod channel;
pub mod citizen_id;
pub mod loss;
pub mod numbers;
pub mod photo;
pub mod policy;
pub mod rejection;
pub mod state;

pub use bank::{BankDirectory, PartnerBank};
pub use card::{Application, Card, CardType, HolderStatus};
pub use channel::{Actor, Channel, Documents, Presenter};
pub use citizen_id::{CitizenId, Gender};
pub use numbers::{BankAccountNumber, CardNumber};
pub use policy::CityPolicy;
pub use rejection::{Rejection, RejectionKind};
pub use state::{FinancialState, LossKind, PhysicalState, SocialState};
