CREATE TABLE pings (event_id uuid PRIMARY KEY, topic text NOT NULL, n int NOT NULL);
