DROP TABLE device_registrations;
DROP TABLE ip_blocks;
