// Publish a `set` as any plugin would, with Node.js and amqplib (ES modules: package.json
// says "type": "module"). `npm install`, then:  node set.js "$PLUGIN"
import amqp from "amqplib";
import { v7 as uuidv7 } from "uuid"; // a UUIDv7 per write: its id and its version

const url = process.env.PLUGIN_STATE_AMQP_URL ?? "amqp://guest:guest@localhost:5672/";
const exchange = process.env.PLUGIN_STATE_PREFIX ?? "plugin_state";
const PLUGIN_ID = process.argv[2];
const user = decodeURIComponent(new URL(url).username); // user_id must be the login's user

const conn = await amqp.connect(url);
const ch = await conn.createConfirmChannel();
const body = { op: "set", id: uuidv7(), plugin_id: PLUGIN_ID, scope_kind: "instance",
               scope_id: null, key: "token", value: "abc" };
ch.publish(exchange, `cmd.${PLUGIN_ID}`, Buffer.from(JSON.stringify(body)),
           { contentType: "application/json", deliveryMode: 2, userId: user,
             messageId: body.id });
await ch.waitForConfirms(); // the broker has it: safe in the commands queue
console.log(body.id);
await conn.close();
