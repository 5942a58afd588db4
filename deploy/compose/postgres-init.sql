-- One database per service (each service migrates its own on start).
CREATE DATABASE shop_users;
CREATE DATABASE shop_orders;
CREATE DATABASE shop_notifications;
