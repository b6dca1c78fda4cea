//! `meshkit.notification.v1.NotificationService` over sea-orm.

use meshkit_common::{
    db::db_error,
    status::{finish_page, id, invalid_argument, page_size},
    time::timestamp,
};
use meshkit_proto::notification::{
    ListNotificationsRequest, ListNotificationsResponse, Notification, notification_service_server::NotificationService,
};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tonic::{Request, Response, Status};

use crate::entity::notification;

const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 1000;

/// The handlers; cheap to clone.
#[derive(Clone)]
pub struct NotificationApi {
    db: DatabaseConnection,
}

impl NotificationApi {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[tonic::async_trait]
impl NotificationService for NotificationApi {
    async fn list_notifications(
        &self,
        request: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        let req = request.into_inner();
        let user_id = id("user_id", &req.user_id)?;
        let limit = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?;
        let mut query = notification::Entity::find()
            .filter(notification::Column::UserId.eq(user_id))
            .order_by_asc(notification::Column::Id);
        if !req.page_token.is_empty() {
            let after = id("page_token", &req.page_token)
                .map_err(|_| invalid_argument("page_token", "is not a token returned by ListNotifications"))?;
            query = query.filter(notification::Column::Id.gt(after));
        }
        let rows = query.limit(limit + 1).all(&self.db).await.map_err(db_error)?;
        let (rows, next_page_token) = finish_page(rows, limit, |r| r.id.clone());
        let notifications = rows
            .into_iter()
            .map(|r| Notification {
                id: r.id,
                user_id: r.user_id,
                event_id: r.event_id,
                message: r.message,
                create_time: Some(timestamp(r.create_time_us)),
            })
            .collect();
        Ok(Response::new(ListNotificationsResponse { notifications, next_page_token }))
    }
}
