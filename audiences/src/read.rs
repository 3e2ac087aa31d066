//! What the query API reads of audiences and computed traits.
