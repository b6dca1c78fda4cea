-- One database per service, as each service owns its data.
CREATE DATABASE users;
CREATE DATABASE orders;
CREATE DATABASE notifications;
CREATE DATABASE scheduler;
