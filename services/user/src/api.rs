//! `meshkit.user.v1.UserService` over sea-orm. The contract's rules
//! (user.proto's `buf.validate` annotations) are checked by the server
//! before a handler runs; the handlers normalise what they store.

use meshkit_common::{
    db::db_error,
    status::{finish_page, id, invalid_argument, page_size},
    time::{now_us, timestamp},
};
use meshkit_proto::user::{
    CreateUserRequest, GetUserRequest, ListUsersRequest, ListUsersResponse, User, user_service_server::UserService,
};
use sea_orm::{ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tonic::{Request, Response, Status};

use crate::entity::user;

const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 1000;

/// The handlers; cheap to clone.
#[derive(Clone)]
pub struct UserApi {
    db: DatabaseConnection,
}

impl UserApi {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[tonic::async_trait]
impl UserService for UserApi {
    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        let req = request.into_inner();
        // The rules allow no control characters, so spaces are all there is to trim.
        let name = req.name.trim_matches(' ').to_owned();
        let email = req.email.to_ascii_lowercase();
        let row = user::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            name: Set(name),
            email: Set(email.clone()),
            create_time_us: Set(now_us()),
        };
        let model = user::Entity::insert(row).exec_with_returning(&self.db).await.map_err(|e| match db_error(e) {
            s if s.code() == tonic::Code::AlreadyExists => {
                Status::already_exists(format!("email: {email:?} is already taken"))
            }
            s => s,
        })?;
        Ok(Response::new(to_proto(model)))
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let id = id("id", &request.get_ref().id)?;
        match user::Entity::find_by_id(id.clone()).one(&self.db).await.map_err(db_error)? {
            Some(model) => Ok(Response::new(to_proto(model))),
            None => Err(Status::not_found(format!("user {id:?} does not exist"))),
        }
    }

    async fn list_users(&self, request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        let req = request.into_inner();
        let limit = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)?;
        let mut query = user::Entity::find().order_by_asc(user::Column::Id);
        if !req.page_token.is_empty() {
            let after = id("page_token", &req.page_token)
                .map_err(|_| invalid_argument("page_token", "is not a token returned by ListUsers"))?;
            query = query.filter(user::Column::Id.gt(after));
        }
        let rows = query.limit(limit + 1).all(&self.db).await.map_err(db_error)?;
        let (rows, next_page_token) = finish_page(rows, limit, |r| r.id.clone());
        Ok(Response::new(ListUsersResponse { users: rows.into_iter().map(to_proto).collect(), next_page_token }))
    }
}

fn to_proto(model: user::Model) -> User {
    User { id: model.id, name: model.name, email: model.email, create_time: Some(timestamp(model.create_time_us)) }
}
