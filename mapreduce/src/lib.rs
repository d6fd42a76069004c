//! # sluice-mapreduce: MapReduce over Kafka (not built yet)
//!
//! This crate will own MapReduce jobs: map tasks over input splits publish
//! key/value records to a shuffle topic with one partition per reducer, keyed
//! by the reduce key; reducers consume their partition, group by key (with
//! spilling), call the reduce function and write Parquet or JSON-lines output.
//!
//! Nothing is implemented yet (see issue "MapReduce over a partitioned Kafka topic").
