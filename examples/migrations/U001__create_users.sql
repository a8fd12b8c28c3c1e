-- belay:tables=users
DROP TABLE users;
