//! Sample data and load for Cepheid.
//!
//! [`clickstream`] generates a realistic e-commerce clickstream (columns
//! `id, eventTime, eventType, productId, categoryId, categoryCode, brand,
//! price, userId, userSession`): heavy-tailed users and products, sessions,
//! price changes, cross-category browsing, abandoned carts, a flash sale,
//! slight out-of-order delivery. It is deterministic for a seed, so the sample
//! committed under `samples/` is reproducible byte for byte.

pub mod clickstream;
pub mod examples;
pub mod rng;
