//! Validation rules of `meshkit.order.v1`, as documented in order.proto.

pub use meshkit_common::status::id;
use meshkit_common::status::invalid_argument;
use meshkit_proto::order::OrderItem;
use tonic::Status;

pub const MAX_ITEMS: usize = 100;
pub const MAX_SKU_LEN: usize = 64;
pub const MAX_QUANTITY: i32 = 10_000;

/// Checks the items of a new order; the message names the item's field,
/// e.g. `items[1].quantity: must be at least 1`.
pub fn items(items: &[OrderItem]) -> Result<(), Status> {
    if items.is_empty() {
        return Err(invalid_argument("items", "an order needs at least one item"));
    }
    if items.len() > MAX_ITEMS {
        return Err(invalid_argument("items", format!("at most {MAX_ITEMS} items per order")));
    }
    for (i, item) in items.iter().enumerate() {
        let sku = item.sku.trim();
        if sku.is_empty() {
            return Err(invalid_argument(&format!("items[{i}].sku"), "must not be empty"));
        }
        if sku.len() > MAX_SKU_LEN || sku.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid_argument(
                &format!("items[{i}].sku"),
                format!("must be 1 to {MAX_SKU_LEN} characters without spaces"),
            ));
        }
        if item.quantity < 1 {
            return Err(invalid_argument(
                &format!("items[{i}].quantity"),
                format!("must be at least 1, got {}", item.quantity),
            ));
        }
        if item.quantity > MAX_QUANTITY {
            return Err(invalid_argument(&format!("items[{i}].quantity"), format!("must be at most {MAX_QUANTITY}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, quantity: i32) -> OrderItem {
        OrderItem { sku: sku.into(), quantity }
    }

    #[test]
    fn rules_name_the_field() {
        assert!(items(&[item("book-1", 2)]).is_ok());
        let cases = [
            (vec![], "items:"),
            (vec![item("book-1", 1), item("", 1)], "items[1].sku:"),
            (vec![item("has space", 1)], "items[0].sku:"),
            (vec![item("book-1", 0)], "items[0].quantity:"),
            (vec![item("book-1", -3)], "items[0].quantity:"),
            (vec![item("book-1", MAX_QUANTITY + 1)], "items[0].quantity:"),
        ];
        for (input, field) in cases {
            let err = items(&input).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with(field), "{field}: {}", err.message());
        }
        assert!(items(&vec![item("a", 1); MAX_ITEMS + 1]).unwrap_err().message().starts_with("items:"));
    }

    #[test]
    fn ids() {
        assert!(id("user_id", "").unwrap_err().message().starts_with("user_id:"));
        assert!(id("user_id", "nope").unwrap_err().message().starts_with("user_id:"));
    }
}
