// The web page in Debian's Chromium, two devices of one user on two hub replicas:
//   node web_e2e.mjs '<json config>'
// config: {urlA, urlB, handle, password, screenshot}. Device "Laptop" (replica A) and device
// "Phone" (replica B) log in; the laptop adds a track from the catalog, the phone sees it in
// Up next without a reload and a notice naming the laptop; the phone removes it, the laptop
// sees it go; both list both devices; "Play here" from the laptop makes the phone the output
// on both. Saves a screenshot of the phone. Prints one JSON line.
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2]);
const result = { steps: [] };
let browser;

async function finish(ok, reason) {
  console.log(JSON.stringify({ ok, reason, ...result }));
  if (browser) await browser.close().catch(() => {});
  process.exit(ok ? 0 : 1);
}
setTimeout(() => finish(false, `timed out after steps ${result.steps.join(", ")}`), 60000);

async function signIn(context, url) {
  const page = await context.newPage();
  page.on("pageerror", (error) => { result.pageErrors = [...(result.pageErrors || []), String(error)]; });
  await page.goto(url);
  await page.getByLabel("Handle").fill(config.handle);
  await page.getByLabel("Password", { exact: true }).fill(config.password);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.locator("#connection", { hasText: "live" }).waitFor();
  return page;
}

try {
  browser = await chromium.launch({
    executablePath: config.chromium || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox"],
  });
  const laptop = await signIn(await browser.newContext(), `${config.urlA}/?device=Laptop`);
  const phone = await signIn(await browser.newContext({ viewport: { width: 390, height: 844 } }), `${config.urlB}/?device=Phone`);
  result.steps.push("both signed in");

  for (const page of [laptop, phone]) {
    await page.locator("#devices li", { hasText: "Laptop" }).waitFor();
    await page.locator("#devices li", { hasText: "Phone" }).waitFor();
  }
  result.steps.push("both list both devices");

  await laptop.getByLabel("Search").fill("Morning Static");
  const addButton = laptop.getByRole("button", { name: "Add Morning Static to the queue" });
  await addButton.click();
  await laptop.getByRole("button", { name: "Add Cross-Device Love to the queue" }).waitFor({ state: "detached" }).catch(() => {});
  // The first track added becomes current; add a second so Up next has one.
  await laptop.getByLabel("Search").fill("Night Ferry");
  await laptop.getByRole("button", { name: "Add Night Ferry to the queue" }).click();
  await laptop.locator("#up-next li", { hasText: "Night Ferry" }).waitFor();
  await laptop.getByLabel("Search").fill("Porchlight");
  await laptop.getByRole("button", { name: "Add Porchlight to the queue" }).click();
  result.steps.push("laptop added three tracks");

  await phone.locator("#now-track", { hasText: "Morning Static" }).waitFor();
  await phone.locator("#up-next li", { hasText: "Night Ferry" }).waitFor();
  await phone.locator("#notice", { hasText: "Queue updated on Laptop" }).waitFor();
  result.notice = await phone.locator("#notice").textContent();
  result.steps.push("phone shows the laptop's edit and names it");

  await phone.getByRole("button", { name: "Remove Night Ferry — Maribel Okafor" }).click();
  await laptop.locator("#up-next li", { hasText: "Night Ferry" }).waitFor({ state: "detached" });
  await laptop.locator("#notice", { hasText: "Queue updated on Phone" }).waitFor();
  result.steps.push("laptop sees the phone's removal");

  // "Play here" on the laptop for the phone: both mark the phone as the output device.
  await laptop.getByRole("button", { name: "Play on Phone" }).click();
  for (const page of [laptop, phone]) {
    await page.locator("#devices li", { hasText: "Phone" }).locator(".badge.output").waitFor();
  }
  await laptop.locator("#now-where", { hasText: "Playing on Phone" }).waitFor();
  result.steps.push("playback moved to the phone on both");

  // Drag-and-drop on the laptop: the dragged entry lands before the one it is dropped on,
  // and the phone shows the new order.
  await laptop.getByLabel("Search").fill("Pinecone");
  await laptop.getByRole("button", { name: "Add Pinecone to the queue" }).click();
  await phone.locator("#up-next li", { hasText: "Pinecone" }).waitFor();
  await laptop.locator("#up-next li", { hasText: "Pinecone" })
    .dragTo(laptop.locator("#up-next li", { hasText: "Porchlight" }));
  await phone.locator("#up-next li").first().filter({ hasText: "Pinecone" }).waitFor();
  // The keyboard alternative: "Down" moves it back.
  await phone.getByRole("button", { name: "Move Pinecone — Field Notes down" }).click();
  await laptop.locator("#up-next li").first().filter({ hasText: "Porchlight" }).waitFor();
  result.steps.push("reordered by drag-and-drop and by button");

  // Play from the laptop: the phone is the output, so it is the phone that plays; a friend
  // who follows this user (through the follow box) sees what is playing.
  await laptop.getByRole("button", { name: "Play", exact: true }).click();
  await phone.locator("#now-where", { hasText: "Playing here" }).waitFor();
  const friend = await browser.newContext();
  const friendPage = await friend.newPage();
  await friendPage.goto(`${config.urlA}/?device=Friend`);
  await friendPage.getByLabel("Handle").fill(config.friendHandle);
  await friendPage.getByLabel("Password", { exact: true }).fill(config.password);
  await friendPage.getByRole("button", { name: "Log in" }).click();
  await friendPage.locator("#connection", { hasText: "live" }).waitFor();
  await friendPage.getByLabel("Follow someone").fill(config.handle);
  await friendPage.getByRole("button", { name: "Follow", exact: true }).click();
  await friendPage.locator("#friends li", { hasText: "listening to Morning Static" }).waitFor();
  result.friendSees = await friendPage.locator("#friends li").first().textContent();
  result.steps.push("a follower sees what the phone plays");

  // Sharing off on the laptop: the follower's list empties; on again: back.
  const sharing = laptop.getByLabel("Let people who follow me see what I play");
  await sharing.uncheck();
  await friendPage.locator("#friends li", { hasText: "listening to Morning Static" }).waitFor({ state: "detached" });
  if (await friendPage.locator("#friends li", { hasText: "listening to" }).count()) throw new Error("the follower still sees something");
  await sharing.check();
  await friendPage.locator("#friends li", { hasText: "listening to Morning Static" }).waitFor();
  result.steps.push("sharing off hides the listening from the follower, on shows it again");

  await phone.locator("#up-next li", { hasText: "Porchlight" }).waitFor();
  await phone.screenshot({ path: config.screenshot, fullPage: true });
  result.screenshot = config.screenshot;
  await finish(true);
} catch (error) {
  await finish(false, String(error));
}
