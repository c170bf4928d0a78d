-- The embedded queue keeps its destination index to deferred messages
-- only: rows leave with the message's deferral (looked up by id).
-- States now also include 'corrupt' (an unreadable envelope, held).
CREATE INDEX IF NOT EXISTS queue_destinations_id ON queue_destinations (id);
