//! Integration tests over the real Kafka protocol (librdkafka's mock cluster,
//! in-process) and the real embedded store. One binary, one module per topic.

mod cli;
mod dead_letter;
mod group;
mod kubernetes;
mod leases;
mod outage;
mod path;
mod reconcile;
mod restart;
mod store_contract;
mod store_crash;
mod tls;
mod utils;
