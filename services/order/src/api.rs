//! `meshkit.order.v1.OrderService` over sea-orm, checking users through the mesh.

use std::collections::HashMap;

use meshkit_common::{
    BalancedChannel,
    db::db_error,
    events::{OutboxEvent, Relay, headers, outbox},
    status::{finish_page, id, invalid_argument, page_size},
    time::{now_us, timestamp},
};
use meshkit_proto::{
    notification::OrderCreated,
    order::{
        CreateOrderRequest, GetOrderRequest, ListOrdersRequest, ListOrdersResponse, Order, OrderItem, OrderStatus,
        order_service_server::OrderService,
    },
    user::{GetUserRequest, user_service_client::UserServiceClient},
};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait,
};
use tonic::{Code, Request, Response, Status};

use crate::entity::{order, order_item};

const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 1000;

/// The topic `OrderCreated` events go to, keyed by order id (the contract's).
pub use meshkit_proto::events::topics::ORDER_EVENTS;

/// The handlers; cheap to clone.
#[derive(Clone)]
pub struct OrderApi {
    db: DatabaseConnection,
    users: UserServiceClient<BalancedChannel>,
    relay: Option<Relay>,
    /// The broker's name of [`ORDER_EVENTS`] (`events.topic_prefix` applied).
    topic: String,
}

impl OrderApi {
    /// `relay` is woken after each commit so this instance's relay (when it is
    /// the elected one) publishes at once instead of at its next poll.
    pub fn new(db: DatabaseConnection, users: UserServiceClient<BalancedChannel>, relay: Option<Relay>) -> Self {
        Self { db, users, relay, topic: ORDER_EVENTS.to_owned() }
    }

    /// Publishes the events to `topic` rather than [`ORDER_EVENTS`]
    /// (`EventSettings::topic` gives the prefixed name).
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// FAILED_PRECONDITION naming the user when it does not exist; the
    /// user-service's own trouble passes on as UNAVAILABLE.
    async fn check_user(&self, user_id: &str) -> Result<(), Status> {
        let mut users = self.users.clone();
        match users.get_user(GetUserRequest { id: user_id.to_owned() }).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => {
                Err(Status::failed_precondition(format!("user_id: user {user_id:?} does not exist")))
            }
            Err(s) if s.code() == Code::InvalidArgument => Err(invalid_argument("user_id", s.message())),
            Err(s) if s.code() == Code::DeadlineExceeded => Err(s),
            Err(s) => {
                tracing::warn!(code = ?s.code(), message = s.message(), "user-service call failed");
                Err(Status::unavailable(format!("user-service unavailable: {}", s.message())))
            }
        }
    }

    async fn load_items(&self, order_ids: Vec<String>) -> Result<HashMap<String, Vec<OrderItem>>, Status> {
        let rows = order_item::Entity::find()
            .filter(order_item::Column::OrderId.is_in(order_ids))
            .order_by_asc(order_item::Column::OrderId)
            .order_by_asc(order_item::Column::Position)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let mut by_order: HashMap<String, Vec<OrderItem>> = HashMap::new();
        for row in rows {
            by_order.entry(row.order_id).or_default().push(OrderItem { sku: row.sku, quantity: row.quantity });
        }
        Ok(by_order)
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn create_order(&self, request: Request<CreateOrderRequest>) -> Result<Response<Order>, Status> {
        let caller_trace = trace_headers(request.metadata());
        let req = request.into_inner();
        // order.proto's rules (ids, 1 to 100 items, skus, quantities) were
        // checked by the server before this handler ran.
        let user_id = id("user_id", &req.user_id)?;
        self.check_user(&user_id).await?;

        let id = uuid::Uuid::now_v7().to_string();
        let create_time_us = now_us();
        let items: Vec<OrderItem> =
            req.items.into_iter().map(|i| OrderItem { sku: i.sku.trim().to_owned(), quantity: i.quantity }).collect();
        let txn = self.db.begin().await.map_err(db_error)?;
        order::Entity::insert(order::ActiveModel {
            id: Set(id.clone()),
            user_id: Set(user_id.clone()),
            status: Set(OrderStatus::Pending as i32),
            create_time_us: Set(create_time_us),
        })
        .exec_without_returning(&txn)
        .await
        .map_err(db_error)?;
        order_item::Entity::insert_many(items.iter().enumerate().map(|(position, item)| order_item::ActiveModel {
            order_id: Set(id.clone()),
            position: Set(position as i32),
            sku: Set(item.sku.clone()),
            quantity: Set(item.quantity),
        }))
        .exec_without_returning(&txn)
        .await
        .map_err(db_error)?;
        // The event commits with the order, or neither does.
        let event_id = uuid::Uuid::now_v7().to_string();
        // The record carries the context of its own "create" span (a child
        // of this call's), so notification's processing joins this trace;
        // with tracing off, the caller's context travels unchanged.
        let producer = meshkit_common::trace::producer_span(&self.topic, &event_id);
        let mut trace = meshkit_common::trace::context_headers(&producer);
        if trace.is_empty() {
            trace = caller_trace;
        }
        drop(producer);
        let event = OrderCreated {
            event_id: event_id.clone(),
            order_id: id.clone(),
            user_id: user_id.clone(),
            total_quantity: items.iter().map(|i| i.quantity).sum(),
            create_time: Some(timestamp(create_time_us)),
        };
        outbox::enqueue(
            &txn,
            OutboxEvent {
                event_id,
                topic: self.topic.clone(),
                key: id.clone(),
                schema: ORDER_CREATED.into(),
                payload: prost::Message::encode_to_vec(&event),
                headers: trace,
            },
        )
        .await
        .map_err(Status::from)?;
        txn.commit().await.map_err(db_error)?;
        if let Some(relay) = &self.relay {
            relay.wake();
        }

        Ok(Response::new(Order {
            id,
            user_id,
            items,
            status: OrderStatus::Pending as i32,
            create_time: Some(timestamp(create_time_us)),
        }))
    }

    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<Order>, Status> {
        let id = id("id", &request.get_ref().id)?;
        let Some(model) = order::Entity::find_by_id(id.clone()).one(&self.db).await.map_err(db_error)? else {
            return Err(Status::not_found(format!("order {id:?} does not exist")));
        };
        let mut items = self.load_items(vec![id]).await?;
        let order_items = items.remove(&model.id).unwrap_or_default();
        Ok(Response::new(to_proto(model, order_items)))
    }

    async fn list_orders(&self, request: Request<ListOrdersRequest>) -> Result<Response<ListOrdersResponse>, Status> {
        let req = request.into_inner();
        let user_id = id("user_id", &req.user_id)?;
        let limit = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?;
        let mut query = order::Entity::find().filter(order::Column::UserId.eq(user_id)).order_by_asc(order::Column::Id);
        if !req.page_token.is_empty() {
            let after = id("page_token", &req.page_token)
                .map_err(|_| invalid_argument("page_token", "is not a token returned by ListOrders"))?;
            query = query.filter(order::Column::Id.gt(after));
        }
        let rows = query.limit(limit + 1).all(&self.db).await.map_err(db_error)?;
        let (rows, next_page_token) = finish_page(rows, limit, |r| r.id.clone());
        let mut items = self.load_items(rows.iter().map(|r| r.id.clone()).collect()).await?;
        let orders = rows
            .into_iter()
            .map(|row| {
                let order_items = items.remove(&row.id).unwrap_or_default();
                to_proto(row, order_items)
            })
            .collect();
        Ok(Response::new(ListOrdersResponse { orders, next_page_token }))
    }
}

/// The schema name carried in the `schema` header of `OrderCreated` records.
pub use meshkit_proto::events::schemas::ORDER_CREATED;

/// The caller's W3C trace context, to travel with the event.
fn trace_headers(metadata: &tonic::metadata::MetadataMap) -> std::collections::BTreeMap<String, String> {
    [headers::TRACEPARENT, headers::TRACESTATE]
        .into_iter()
        .filter_map(|name| {
            let value = metadata.get(name)?.to_str().ok()?;
            (!value.is_empty()).then(|| (name.to_owned(), value.to_owned()))
        })
        .collect()
}

fn to_proto(model: order::Model, items: Vec<OrderItem>) -> Order {
    Order {
        id: model.id,
        user_id: model.user_id,
        items,
        status: model.status,
        create_time: Some(timestamp(model.create_time_us)),
    }
}
