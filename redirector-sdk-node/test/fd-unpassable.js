'use strict';
// Preloaded (`node -r`) into a demo by test/node-demo.test.js: the hook cannot pass the
// descriptors of an export answer (as when its connection to the agent breaks while it writes
// them), so the connections it offered stay with the application and come back with the
// outcome. Not a test file itself (run alone, it does nothing).

if (require.main === module) return;
const fds = require('../lib/fds');

fds.writeWithDescriptors = async (sock, line, handles) => {
  sock.destroy(new Error('descriptors cannot be passed here (test/fd-unpassable.js)'));
  return handles.map(() => false);
};
