//! order-service's job handlers, run by the scheduler through `JobExecutor`.

use meshkit_common::{jobs::JobContext, time::now_us};
use meshkit_proto::order::OrderStatus;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect, sea_query::Expr};
use serde_json::Value;

use crate::entity::order;

/// The handler that cancels unpaid orders.
pub const CANCEL_UNPAID: &str = "cancel-unpaid-orders";

/// What `cancel-unpaid-orders` reads from the job's param (JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct CancelUnpaid {
    /// Orders still pending this long after they were placed are cancelled.
    pub older_than_secs: i64,
    /// At most this many per run.
    pub limit: u64,
}

impl CancelUnpaid {
    /// `{"older_than_secs": 900, "limit": 1000}`; both optional (15 min, 1000).
    pub fn parse(param: &str) -> Result<Self, String> {
        let mut parsed = Self { older_than_secs: 900, limit: 1000 };
        if param.trim().is_empty() {
            return Ok(parsed);
        }
        let value: Value = serde_json::from_str(param).map_err(|e| format!("param is not JSON: {e}"))?;
        let Value::Object(fields) = value else { return Err("param must be a JSON object".into()) };
        for (key, v) in fields {
            match key.as_str() {
                "older_than_secs" => {
                    parsed.older_than_secs = v
                        .as_i64()
                        .filter(|n| *n >= 0)
                        .ok_or_else(|| format!("older_than_secs: {v} is not a whole number of seconds >= 0"))?;
                }
                "limit" => {
                    parsed.limit = v
                        .as_u64()
                        .filter(|n| (1..=100_000).contains(n))
                        .ok_or_else(|| format!("limit: {v} is outside 1..=100000"))?;
                }
                other => return Err(format!("unknown param field {other:?} (older_than_secs, limit)")),
            }
        }
        Ok(parsed)
    }
}

/// Whether order `id` belongs to shard `index` of `total`: by the random
/// tail of its UUIDv7, so shards are even and fixed for an order.
pub fn in_shard(id: &str, index: u32, total: u32) -> bool {
    if total <= 1 {
        return true;
    }
    let tail = id.get(id.len().saturating_sub(8)..).unwrap_or("");
    u32::from_str_radix(tail, 16).map_or(index == 0, |n| n % total == index)
}

/// Cancels this shard's pending orders older than the param says. Each is
/// cancelled only if it is still pending, so a run repeated (a retry, two
/// overlapping runs) changes nothing twice.
pub async fn cancel_unpaid(db: DatabaseConnection, ctx: JobContext) -> Result<String, String> {
    let params = CancelUnpaid::parse(&ctx.param)?;
    let cutoff = now_us() - params.older_than_secs * 1_000_000;
    let mut cancelled = 0u64;
    let mut seen = 0u64;
    let mut after = String::new();
    loop {
        let page: Vec<String> = order::Entity::find()
            .select_only()
            .column(order::Column::Id)
            .filter(order::Column::Status.eq(OrderStatus::Pending as i32))
            .filter(order::Column::CreateTimeUs.lt(cutoff))
            .filter(order::Column::Id.gt(after.as_str()))
            .order_by_asc(order::Column::Id)
            .limit(500)
            .into_tuple()
            .all(&db)
            .await
            .map_err(|e| format!("reading pending orders: {e}"))?;
        let Some(last) = page.last() else { break };
        after = last.clone();
        let mine: Vec<String> = page.into_iter().filter(|id| in_shard(id, ctx.shard_index, ctx.shard_total)).collect();
        let room = params.limit.saturating_sub(cancelled);
        let batch: Vec<String> = mine.into_iter().take(usize::try_from(room).unwrap_or(usize::MAX)).collect();
        seen += batch.len() as u64;
        if !batch.is_empty() {
            let result = order::Entity::update_many()
                .col_expr(order::Column::Status, Expr::value(OrderStatus::Cancelled as i32))
                .filter(order::Column::Id.is_in(batch))
                .filter(order::Column::Status.eq(OrderStatus::Pending as i32))
                .exec(&db)
                .await
                .map_err(|e| format!("cancelling orders: {e}"))?;
            cancelled += result.rows_affected;
        }
        if cancelled >= params.limit {
            break;
        }
    }
    tracing::info!(cancelled, shard = ctx.shard_index, of = ctx.shard_total, "unpaid orders cancelled");
    Ok(format!(
        "cancelled {cancelled} of {seen} unpaid orders placed over {} s ago (shard {} of {})",
        params.older_than_secs, ctx.shard_index, ctx.shard_total
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_read_and_bad_ones_named() {
        assert_eq!(CancelUnpaid::parse("").unwrap(), CancelUnpaid { older_than_secs: 900, limit: 1000 });
        assert_eq!(
            CancelUnpaid::parse(r#"{"older_than_secs": 0, "limit": 5}"#).unwrap(),
            CancelUnpaid { older_than_secs: 0, limit: 5 }
        );
        assert!(CancelUnpaid::parse("{").unwrap_err().contains("not JSON"));
        assert!(CancelUnpaid::parse(r#"{"older_than_secs": -1}"#).unwrap_err().contains("older_than_secs"));
        assert!(CancelUnpaid::parse(r#"{"limit": 0}"#).unwrap_err().contains("limit"));
        assert!(CancelUnpaid::parse(r#"{"olderThan": 1}"#).unwrap_err().contains("unknown param field"));
    }

    #[test]
    fn shards_split_orders_evenly_and_disjointly() {
        let ids: Vec<String> = (0..3000).map(|_| uuid::Uuid::now_v7().to_string()).collect();
        let counts: Vec<usize> = (0..3).map(|shard| ids.iter().filter(|id| in_shard(id, shard, 3)).count()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 3000, "every order in exactly one shard");
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
