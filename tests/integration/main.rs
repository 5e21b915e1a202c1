//! Integration tests over the real Kafka protocol (librdkafka's mock cluster,
//! in-process, and Apache Kafka from scripts/services) and the real embedded
//! store. One binary, one module per topic.

mod campaign;
mod cli;
mod dead_letter;
mod endpoint;
mod first_hour;
mod group;
mod hostile;
mod http;
mod input;
mod kafka;
mod kubernetes;
mod leases;
mod library;
mod observe;
mod outage;
mod path;
mod pg_tls;
mod readme;
mod reconcile;
mod replay;
mod restart;
mod serve;
mod store_contract;
mod store_crash;
mod tls;
mod utils;
mod window;
