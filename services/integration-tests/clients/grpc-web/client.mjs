// A grpc-web client calling meshkit through the gateway: Connect's grpc-web
// transport over HTTP/1.1, as a browser would use it, with message types
// built at run time from meshkit's descriptor set (no generated code).
//
//   node client.mjs --base-url http://127.0.0.1:8080 --descriptors meshkit.binpb [--email e]
//
// Creates a user and an order, reads them back, checks NOT_FOUND on a missing
// user, and prints one JSON line.

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { ConnectError, Code, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";

const { values } = parseArgs({
  options: {
    "base-url": { type: "string" },
    descriptors: { type: "string" },
    email: { type: "string", default: "web@example.com" },
  },
});

const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, readFileSync(values.descriptors)));
const service = (name) => {
  const s = registry.getService(name);
  if (!s) throw new Error(`no service ${name} in the descriptor set`);
  return s;
};
const transport = createGrpcWebTransport({ baseUrl: values["base-url"], httpVersion: "1.1" });
const users = createClient(service("meshkit.user.v1.UserService"), transport);
const orders = createClient(service("meshkit.order.v1.OrderService"), transport);

const user = await users.createUser({ name: "Web", email: values.email });
const again = await users.getUser({ id: user.id });
if (again.email !== values.email) throw new Error(`read back ${again.email}`);
const order = await orders.createOrder({ userId: user.id, items: [{ sku: "web-1", quantity: 3 }] });
const fetched = await orders.getOrder({ id: order.id });
let missing = "OK";
try {
  await users.getUser({ id: "0190c3a4-0000-7000-8000-000000000000" });
} catch (e) {
  missing = ConnectError.from(e).code === Code.NotFound ? "NOT_FOUND" : String(e);
}
console.log(
  JSON.stringify({
    user_id: user.id,
    order_id: fetched.id,
    quantity: fetched.items[0].quantity,
    missing_user: missing,
  }),
);
